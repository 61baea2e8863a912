"""Assets of `optimum-lrpq demo`: a small ViT trained by the project on real MNIST digits, and labelled digits.

- `MODEL_DIR`: `ViTForImageClassification` (28x28, patch 7, hidden 64, 4 layers; ~96% test accuracy) with its
  `preprocessor_config.json`, trained by `scripts/train_demo_model.py` (see `training.json`).
- `DIGITS_PATH`: `mnist_digits.npz` with 500 held-out test digits (50 per class) and 64 training digits used for
  calibration, uint8 28x28 greyscale with labels.

Everything works offline; see README.md in this folder for the data's origin and license.
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(DEMO_DIR, "model")
DIGITS_PATH = os.path.join(DEMO_DIR, "mnist_digits.npz")
DATASET_NAME = "MNIST digits shipped with optimum-lrpq"


def load_digits():
    """The shipped digits as a `datasets.DatasetDict`: "train" (64 calibration digits) and "test" (500 digits).

    Columns: `image` (greyscale PIL images, mode "L") and `label` (ClassLabel "0".."9").
    """
    import datasets
    import numpy as np
    from PIL import Image

    arrays = np.load(DIGITS_PATH)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def split(prefix: str):
        images = [Image.fromarray(a, mode="L") for a in arrays[f"{prefix}_images"]]
        return datasets.Dataset.from_dict({"image": images, "label": arrays[f"{prefix}_labels"].tolist()},
                                          features=features)

    return datasets.DatasetDict({"train": split("calibration"), "test": split("test")})
