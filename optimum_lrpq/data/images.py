"""Column conventions of image datasets and the image-mode conversion, shared by calibration and evaluation."""

from __future__ import annotations

from typing import Any

LABEL_COLUMNS = ("label", "labels")
IMAGE_COLUMNS = ("image", "img", "pixel_values")


def to_rgb(image: Any, channels: int) -> Any:
    """A PIL image in the mode the model wants (greyscale / RGBA datasets are common); other inputs unchanged."""
    mode = "RGB" if channels == 3 else "L" if channels == 1 else None
    if mode and hasattr(image, "convert") and getattr(image, "mode", mode) != mode:
        return image.convert(mode)
    return image
