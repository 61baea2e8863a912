"""Calibration data: accept every form listed in SPEC §1 and turn it into checked pixel-value micro-batches.

Accepted: a `torch.Tensor` [N, C, H, W]; a `datasets.Dataset` / `IterableDataset` with a `pixel_values` column,
or with an image column plus an image processor (given, or the model's own found by `AutoImageProcessor`);
a list (or tuple) of PIL images, processed like a dataset's image column; a `DataLoader` or any iterable of batches
(tensors, or dicts with `pixel_values` and optional `labels`). Everything is validated before the model is touched.

When the labels are used (relevance started at the label), a dataset label column that names its classes is
matched to the model's labels by name (`optimum_lrpq.data.labels`), and refused when the names differ.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..data.images import IMAGE_COLUMNS, LABEL_COLUMNS, to_rgb
from ..data.labels import label_mapping

logger = logging.get_logger(__name__)


@dataclass
class CalibrationSet:
    batches: list[torch.Tensor]  # float pixel values, [b, C, H, W] each
    labels: list[torch.Tensor] | None  # same batching, or None when the data had no labels

    @property
    def num_images(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def first(self, n: int | None) -> CalibrationSet:
        """The first `n` images (all of them for None), in the same micro-batches."""
        if n is None or n >= self.num_images:
            return self
        batches, labels, left = [], [] if self.labels is not None else None, n
        for index, batch in enumerate(self.batches):
            if left <= 0:
                break
            batches.append(batch[:left])
            if labels is not None:
                labels.append(self.labels[index][:left])
            left -= batch.shape[0]
        return CalibrationSet(batches, labels)


def _expected_geometry(model_config, fixed_size: bool = True) -> tuple[int, tuple[int, int] | None]:
    channels = getattr(model_config, "num_channels", 3)
    size = getattr(model_config, "image_size", None) if fixed_size else None
    if isinstance(size, int):
        size = (size, size)
    elif size is not None:
        size = tuple(size)
    return channels, size


def check_pixel_values(pixel_values: Any, model_config, where: str = "calibration data",
                       fixed_size: bool = True) -> torch.Tensor:
    """Validate one batch of pixel values against the model's expected input; return it as a tensor."""
    if isinstance(pixel_values, np.ndarray):
        pixel_values = torch.from_numpy(pixel_values)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"{where}: expected pixel values as a torch.Tensor, got {type(pixel_values).__name__}. Pass a tensor, "
            "a datasets.Dataset with a 'pixel_values' or image column, or a DataLoader of such batches."
        )
    channels, size = _expected_geometry(model_config, fixed_size)
    if pixel_values.ndim != 4:
        hint = " Add a batch dimension with `x.unsqueeze(0)`." if pixel_values.ndim == 3 else ""
        raise ValueError(
            f"{where}: pixel values must have shape [batch, {channels}, height, width], got {tuple(pixel_values.shape)}.{hint}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{where}: pixel values must be floating point (normalized images), got dtype {pixel_values.dtype}. "
            "Run the images through the model's image processor, or convert with `.float()` and normalize them."
        )
    if pixel_values.shape[1] != channels:
        raise ValueError(
            f"{where}: the model expects {channels} channels, got {pixel_values.shape[1]} "
            f"(shape {tuple(pixel_values.shape)}). Convert the images (e.g. PIL `.convert('RGB')`) before processing."
        )
    if size is not None and tuple(pixel_values.shape[2:]) != size:
        raise ValueError(
            f"{where}: the model expects {size[0]}x{size[1]} images, got {pixel_values.shape[2]}x{pixel_values.shape[3]}. "
            "Resize with the model's image processor."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError(f"{where}: pixel values contain NaN or Inf.")
    return pixel_values


def _is_hf_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def _dataset_columns(data) -> list[str]:
    names = getattr(data, "column_names", None)
    if names is None and getattr(data, "features", None) is not None:
        names = list(data.features)
    return list(names or [])


def _find_image_column(data, requested: str | None) -> str:
    columns = _dataset_columns(data)
    if requested is not None:
        if columns and requested not in columns:
            raise ValueError(f"The dataset has no column {requested!r}; available columns: {columns}.")
        return requested
    features = getattr(data, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image":
            return name
    for name in IMAGE_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"Could not find an image column in the dataset (columns: {columns}). Name it with `image_column=`, or "
        "provide a 'pixel_values' column."
    )


def _resolve_processor(model, image_processor):
    if image_processor is not None:
        return image_processor
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "The calibration data holds raw images, and the model has no name or path to find its image "
            "processor. Pass `image_processor=` (e.g. AutoImageProcessor.from_pretrained(...)) or a 'pixel_values' column."
        )
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name)
    except Exception as err:  # the processor may be missing or unreachable offline
        raise ValueError(
            f"Could not load the image processor of {name!r} ({err}). Pass `image_processor=` explicitly."
        ) from err


def _examples_to_batches(examples, model, image_processor, image_column, channels):
    """Per-example dicts -> (pixel_values tensor, labels tensor or None)."""
    pixels, labels = [], []
    processor = None
    for example in examples:
        if "pixel_values" in example and image_column in (None, "pixel_values"):
            value = example["pixel_values"]
            pixels.append(value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)))
        else:
            if processor is None:
                processor = _resolve_processor(model, image_processor)
            image = to_rgb(example[image_column], channels)
            pixels.append(processor(images=image, return_tensors="pt")["pixel_values"][0])
        label = next((example[c] for c in LABEL_COLUMNS if c in example), None)
        labels.append(label)
    if not pixels:
        return None, None
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) > 1:
        raise ValueError(f"Calibration images have different shapes {sorted(shapes)}; resize them to one size.")
    stacked = torch.stack(pixels)
    label_tensor = torch.as_tensor(labels) if all(lab is not None for lab in labels) else None
    return stacked, label_tensor


def _iterate_dataset(data, model, image_processor, image_column, num_samples, channels, need_labels=False):
    columns = _dataset_columns(data)
    column = None if "pixel_values" in columns and image_column is None else _find_image_column(data, image_column)
    # Checked before any image is read: labels the model cannot be told apart from wrong ones are refused.
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    mapping = label_mapping(data, label_column, model.config) if need_labels and label_column else None
    examples = list(itertools.islice(iter(data), num_samples))
    pixels, labels = _examples_to_batches(examples, model, image_processor, column, channels)
    if mapping is not None and labels is not None:
        labels = torch.as_tensor([mapping.get(int(label), int(label)) for label in labels.tolist()])
    return pixels, labels


def _is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _iterate_images(images, model, image_processor, num_samples, channels):
    """A list of PIL images: the first `num_samples`, processed as a dataset's image column would be."""
    chosen = list(images[:num_samples])
    for index, image in enumerate(chosen):
        if not _is_pil_image(image):
            raise TypeError(
                f"Calibration data given as a list of PIL images holds a {type(image).__name__} at index {index}; "
                "pass only PIL images (or a tensor / dataset / DataLoader of pixel values)."
            )
    return _examples_to_batches([{"image": image} for image in chosen], model, image_processor, "image", channels)


def _iterate_batches(data: Iterable, num_samples: int):
    pixels, labels, seen = [], [], 0
    for batch in data:
        if seen >= num_samples:
            break
        label = None
        if isinstance(batch, Mapping):
            if "pixel_values" not in batch:
                raise ValueError(
                    f"Calibration batches given as dicts need a 'pixel_values' entry; got keys {sorted(batch)}."
                )
            label = next((batch[c] for c in LABEL_COLUMNS if c in batch), None)
            batch = batch["pixel_values"]
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch, label = batch[0], (batch[1] if len(batch) > 1 else None)  # (images, labels) like torchvision
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        pixels.append(batch)
        labels.append(label)
        seen += batch.shape[0] if isinstance(batch, torch.Tensor) and batch.ndim == 4 else 1
    return pixels, labels


def prepare_calibration_data(
    data: Any,
    model,
    *,
    num_samples: int,
    batch_size: int,
    image_processor=None,
    image_column: str | None = None,
    fixed_image_size: bool = True,
    need_labels: bool = False,
) -> CalibrationSet:
    """Validate `data` and cut its first `num_samples` images into micro-batches of `batch_size`.

    Args:
        data: pixel values, a `datasets` dataset, a list of PIL images, or an iterable of batches (module docstring).
        model: the float model; its config gives the expected channels and image size, and its labels.
        num_samples: how many images to keep.
        batch_size: micro-batch size.
        image_processor: turns raw images (a dataset's image column, PIL images) into pixel values; default: the
            model's own, found by `AutoImageProcessor`.
        image_column: the dataset's image column, if it cannot be found automatically.
        fixed_image_size: the model only takes its configured image size.
        need_labels: the labels will be used (relevance at the label): a dataset's class names are matched to the
            model's labels, and refused (`LabelMismatchError`, a ValueError) when they differ.
    """

    def check(values, where="calibration data"):
        return check_pixel_values(values, model.config, where, fixed_size=fixed_image_size)

    if data is None:
        raise ValueError(
            "quantize_model needs calibration data: a tensor of pixel values, a datasets.Dataset, or a DataLoader."
        )
    channels, _ = _expected_geometry(model.config)
    if isinstance(data, torch.Tensor):
        pixels, labels = check(data), None
    elif isinstance(data, Mapping) and "pixel_values" in data:  # a BatchFeature from an image processor
        pixels = check(data["pixel_values"])
        labels = next((torch.as_tensor(data[c]) for c in LABEL_COLUMNS if c in data), None)
    elif _is_hf_dataset(data):
        pixels, labels = _iterate_dataset(data, model, image_processor, image_column, num_samples, channels,
                                          need_labels)
    elif isinstance(data, (list, tuple)) and data and _is_pil_image(data[0]):
        pixels, labels = _iterate_images(data, model, image_processor, num_samples, channels)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        parts, part_labels = _iterate_batches(data, num_samples)
        parts = [check(p, f"calibration batch {i}") for i, p in enumerate(parts)]
        pixels = torch.cat(parts) if parts else None
        labels = (
            torch.cat([torch.as_tensor(lab).reshape(-1) for lab in part_labels])
            if parts and all(lab is not None for lab in part_labels) else None
        )
    else:
        raise TypeError(
            f"Unsupported calibration data of type {type(data).__name__}. Pass a torch.Tensor [N, C, H, W], a "
            "datasets.Dataset/IterableDataset, a list of PIL images, or an iterable (e.g. DataLoader) of tensors or "
            "dicts with 'pixel_values'."
        )
    if pixels is None or pixels.shape[0] == 0:
        raise ValueError("The calibration data is empty: provide at least one image.")
    pixels = check(pixels)[:num_samples]
    if labels is not None:
        labels = labels.reshape(-1)[:num_samples]
        if labels.shape[0] != pixels.shape[0]:
            labels = None
    if pixels.shape[0] < num_samples:
        logger.info(f"Calibrating on {pixels.shape[0]} images (num_calibration_samples={num_samples}).")
    batches = list(pixels.split(batch_size))
    return CalibrationSet(batches, list(labels.split(batch_size)) if labels is not None else None)
