"""Real files the CLI and loading tests read (a saved tiny model, an image dataset directory, an image folder), and
saved checkpoints rewritten as older formats wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import IMAGE_SIZE, NUM_LABELS, build

CLASS_NAMES = [f"class_{i}" for i in range(NUM_LABELS)]


# ---------------------------------------------------------------------------------------------------------------------
# builders shared with test_examples.py and test_on_the_fly.py
# ---------------------------------------------------------------------------------------------------------------------


def make_model_dir(path: Path, name: str = "vit") -> Path:
    """A tiny float model saved with a (PIL-backend, no torchvision needed) ViT image processor."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    build(name).save_pretrained(path)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def make_images(count: int, seed: int) -> list[Image.Image]:
    """Random 40x40 images in mixed modes (RGB, greyscale, RGBA): the model wants RGB 32x32."""
    rng = np.random.default_rng(seed)
    modes = ("RGB", "L", "RGBA")
    images = []
    for i in range(count):
        mode = modes[i % 3]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = (rng.random((40, 40, channels)) * 255).astype(np.uint8)
        images.append(Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return images


def make_dataset_dir(path: Path, train: int = 12, validation: int = 8) -> Path:
    """A `DatasetDict.save_to_disk` directory: splits train/validation, columns image (mixed modes) and label."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    splits = {
        split: datasets.Dataset.from_dict(
            {"image": make_images(count, seed), "label": [i % NUM_LABELS for i in range(count)]}, features=features
        )
        for split, count, seed in (("train", train, 0), ("validation", validation, 1))
    }
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def make_image_folder(path: Path, count: int = 10) -> Path:
    """An `imagefolder` directory `path/train/<class>/*.png` (mixed image modes)."""
    for i, image in enumerate(make_images(count, seed=2)):
        folder = path / "train" / CLASS_NAMES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine can be 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_older_format(folder: Path, version: int, *fields: str) -> None:
    """Rewrite a saved lrpq checkpoint's config as format `version` wrote it: without the `fields` added since."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for name in fields:
        del config["quantization_config"][name]
    config["quantization_config"]["format_version"] = version
    path.write_text(json.dumps(config))
