"""Top-1 accuracy and throughput of an image classifier on a `datasets` dataset (used by the CLI and the demo)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from ..data.images import to_rgb
from ..data.labels import label_mapping
from ..data.loading import resolve_columns


def _batches(dataset, batch_size: int, limit: int | None) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for i, example in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        batch.append(example)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _num_examples(dataset, limit: int | None) -> int | None:
    try:
        total = len(dataset)
    except TypeError:  # streamed
        return limit
    return total if limit is None else min(total, limit)


@torch.inference_mode()
def evaluate_classifier(
    model,
    dataset,
    *,
    image_processor=None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    show_progress: bool = True,
    desc: str = "Evaluating",
) -> dict[str, Any]:
    """Top-1 accuracy (with the offline `evaluate` accuracy module) and throughput of `model` on `dataset`.

    Images are converted to the mode the model wants (greyscale / RGBA -> RGB) and preprocessed by
    `image_processor` (or taken from a `pixel_values` column). Throughput counts the model's forward passes only.

    When the label column names its classes (`ClassLabel`) and the model names its labels (`id2label`), the names
    decide which dataset id is which model id (see `optimum_lrpq.data.labels`); names that are not model labels
    are refused before any image is evaluated.

    Returns:
        {"accuracy", "num_images", "seconds" (forward passes), "images_per_second", "predictions", "references"}.

    Raises:
        ValueError: raw images without `image_processor`, an empty dataset, or a missing column.
        optimum_lrpq.data.labels.LabelMismatchError: (a ValueError) class names that are not the model's labels.
    """
    from tqdm.auto import tqdm

    from . import load_accuracy

    image_column, label_column = resolve_columns(dataset, image_column, label_column)
    if image_column != "pixel_values" and image_processor is None:
        raise ValueError("The dataset holds raw images: pass the model's image processor (`image_processor=`).")
    mapping = label_mapping(dataset, label_column, model.config)
    channels = getattr(model.config, "num_channels", 3)
    param = next(model.parameters())
    model.eval()
    metric = load_accuracy()
    predictions: list[int] = []
    references: list[int] = []
    seconds = 0.0
    progress = tqdm(total=_num_examples(dataset, limit), desc=desc, unit="img", disable=not show_progress)
    try:
        for batch in _batches(dataset, batch_size, limit):
            if image_column == "pixel_values":
                pixels = torch.stack([torch.as_tensor(e["pixel_values"]) for e in batch])
            else:
                images = [to_rgb(e[image_column], channels) for e in batch]
                pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            labels = [int(e[label_column]) for e in batch]
            if mapping is not None:
                labels = [mapping.get(label, label) for label in labels]
            start = time.perf_counter()
            logits = model(pixel_values=pixels.to(device=param.device, dtype=param.dtype)).logits
            seconds += time.perf_counter() - start
            predicted = logits.argmax(-1).tolist()
            metric.add_batch(predictions=predicted, references=labels)
            predictions += predicted
            references += labels
            progress.update(len(batch))
    finally:
        progress.close()
    if not references:
        raise ValueError("The evaluation dataset is empty.")
    return {
        "accuracy": metric.compute()["accuracy"],
        "num_images": len(references),
        "seconds": seconds,
        "images_per_second": len(references) / seconds if seconds > 0 else float("inf"),
        "predictions": predictions,
        "references": references,
    }
