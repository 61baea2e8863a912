"""Architecture adapters. Importing this package registers every supported architecture."""

from . import dinov2, swin, vit  # noqa: F401  (registration side effects)
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
