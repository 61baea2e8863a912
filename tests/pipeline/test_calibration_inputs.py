"""Every calibration-data form from SPEC §1 is accepted and gives the same quantized model."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_SIZE, build, logits, pixels
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTImageProcessorPil

from optimum_lrpq import LRPQConfig, LRPQuantizer

CONFIG = {"weight_bits": 8, "activation_bits": 8, "mixed_precision": False, "num_calibration_samples": 8,
          "calibration_batch_size": 4}


def quantized_logits(data, **kwargs):
    model = build("vit")
    LRPQuantizer(LRPQConfig(**CONFIG)).quantize_model(model, data, show_progress=False, **kwargs)
    return logits(model, pixels(2, seed=5))


@pytest.fixture(scope="module")
def reference():
    return quantized_logits(pixels(8))


def test_tensor_and_extra_images_are_ignored(reference):
    # only the first num_calibration_samples images are used
    assert torch.equal(quantized_logits(torch.cat([pixels(8), 100 * pixels(4)])), reference)


def test_dataloader_of_tensors_and_tuples(reference):
    assert torch.equal(quantized_logits(DataLoader(pixels(8), batch_size=3)), reference)
    labels = torch.arange(8) % 5
    assert torch.equal(quantized_logits(DataLoader(TensorDataset(pixels(8), labels), batch_size=4)), reference)


def test_iterable_of_dicts(reference):
    batches = [{"pixel_values": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in pixels(8).split(2)]
    assert torch.equal(quantized_logits(batches), reference)


def test_dataset_with_pixel_values(reference):
    ds = datasets.Dataset.from_dict({"pixel_values": pixels(8).numpy(), "label": list(range(8))})
    assert torch.equal(quantized_logits(ds), reference)
    ds.set_format("torch")
    assert torch.equal(quantized_logits(ds), reference)


def test_iterable_dataset_with_pixel_values(reference):
    ds = datasets.Dataset.from_dict({"pixel_values": pixels(8).numpy()}).to_iterable_dataset()
    assert torch.equal(quantized_logits(ds), reference)


def _image_dataset(mode: str):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, channels) if channels > 1 else (40, 40), dtype=np.uint8),
                              mode) for _ in range(8)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcde"))})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(8)]}, features=features)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_dataset_of_images_with_processor(mode):
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    out = quantized_logits(_image_dataset(mode), image_processor=processor)
    assert torch.isfinite(out).all()


def test_dataset_of_images_without_processor_says_how_to_fix():
    with pytest.raises(ValueError, match="image_processor="):
        quantized_logits(_image_dataset("RGB"))


def test_unknown_image_column_lists_columns():
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    with pytest.raises(ValueError, match=r"no column 'photo'.*\['image', 'label'\]"):
        quantized_logits(_image_dataset("RGB"), image_processor=processor, image_column="photo")


def test_one_image_is_enough():
    out = quantized_logits(pixels(1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_list_of_pil_images_is_calibrated_like_a_dataset_of_them(mode):
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    dataset = _image_dataset(mode)
    images = list(dataset["image"])
    assert all(isinstance(image, Image.Image) and image.mode == mode for image in images)
    expected = quantized_logits(dataset, image_processor=processor)
    assert torch.equal(quantized_logits(images, image_processor=processor), expected)
    assert torch.equal(quantized_logits(tuple(images) + tuple(images), image_processor=processor), expected)


def test_list_of_pil_images_without_processor_says_how_to_fix():
    images = list(_image_dataset("RGB")["image"])
    with pytest.raises(ValueError, match=r"calibration data holds raw images.*Pass `image_processor=`"):
        quantized_logits(images)


def test_list_mixing_pil_images_and_tensors_names_the_odd_one():
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    images = [*_image_dataset("RGB")["image"][:3], pixels(1)[0]]
    with pytest.raises(TypeError, match="holds a Tensor at index 3; pass only PIL images"):
        quantized_logits(images, image_processor=processor)
