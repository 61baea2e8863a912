"""What the quantizer needs to know about an architecture, and the registry of supported ones.

An adapter turns a model into a `ModelLayout`: module names (as in `model.named_modules()`) of the layers to
quantize and how they connect. Everything architecture-specific lives in one small file per family
(`vit.py`, `swin.py`); adding one means writing a `layout` function and calling `register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerNormGroup:
    """A LayerNorm whose output feeds only the linears in `consumers` (q/k/v, fc1, patch-merging reduction).

    Its output gets one quantizer shared by all consumers: per channel during calibration, then folded into
    the LayerNorm affine and the consumers' weights (reparameterization).
    """

    layernorm: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """One transformer block, for the per-block bookkeeping of relevance and allocation."""

    attention: str
    attention_linears: tuple[str, ...]  # q, k, v, o
    mlp_linears: tuple[str, ...]  # fc1, fc2


@dataclass(frozen=True)
class ModelLayout:
    patch_embedding: str  # the Conv2d that embeds patches; its input is the image
    groups: tuple[LayerNormGroup, ...]
    linears: tuple[str, ...]  # linears with their own (per-tensor) input quantizer: o_proj, fc2, heads
    attentions: tuple[str, ...]  # modules that call the attention function
    blocks: tuple[Block, ...]
    heads: tuple[str, ...]

    def weight_layers(self) -> list[str]:
        """Every layer with a quantized weight, in forward order where it matters little: conv, groups, rest."""
        names = [self.patch_embedding]
        for group in self.groups:
            names.extend(group.consumers)
        names.extend(self.linears)
        return names


@dataclass(frozen=True)
class ArchitectureAdapter:
    model_type: str
    model_classes: tuple[str, ...]
    layout: Callable[[nn.Module], ModelLayout]


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> None:
    _ADAPTERS[adapter.model_type] = adapter


def supported_models() -> list[str]:
    return sorted(cls for adapter in _ADAPTERS.values() for cls in adapter.model_classes)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`, or a ValueError listing what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None or type(model).__name__ not in adapter.model_classes:
        raise ValueError(
            f"optimum-lrpq does not support {type(model).__name__} (model_type={model_type!r}). "
            f"Supported models: {', '.join(supported_models())}. Load one of these classes, e.g. with "
            "AutoModelForImageClassification, or open an issue to request the architecture."
        )
    return adapter
