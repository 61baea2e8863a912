"""Architecture adapters, one small module per family (`vit.py`, `swin.py`, `dinov2.py`, ...).

Importing this package imports every module in it, and each registers its adapter with `register_adapter`: adding
an architecture is one new file here (plus its tiny test model in `tests/tiny_models.py`).
"""

import importlib
import pkgutil

from .base import (
    ArchitectureAdapter,
    Block,
    LayerNormGroup,
    LayoutBuilder,
    ModelLayout,
    ResidualSite,
    get_adapter,
    register_adapter,
    supported_models,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ArchitectureAdapter",
    "Block",
    "LayerNormGroup",
    "LayoutBuilder",
    "ModelLayout",
    "ResidualSite",
    "get_adapter",
    "register_adapter",
    "supported_models",
]
