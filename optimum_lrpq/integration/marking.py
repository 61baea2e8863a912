"""Marking a model instance as lrpq-quantized: what `from_pretrained` sets on a pre-quantized model, set by hand
after an in-memory `quantize_model`, so `save_pretrained` / `push_to_hub` treat both alike."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..configuration import LRPQConfig
from .model_card import MODEL_TAGS
from .serialization import attach_save_methods


def mark_quantized(model: nn.Module, config: LRPQConfig, hf_quantizer: Any) -> None:
    """Record `config` on `model` and mark it (and its sub-configs) quantized by `hf_quantizer`.

    Also gives the instance the card-writing, atomic `save_pretrained` / `push_to_hub` (`serialization`).
    """
    model.config.quantization_config = config
    model.hf_quantizer = hf_quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    finish_quantized(model)
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_is_quantized"):
            module.config._is_quantized = True
    model.config._is_quantized = True


def finish_quantized(model: nn.Module) -> None:
    """The part shared with loading: tags and the instance's save methods."""
    model.add_model_tags(list(MODEL_TAGS))
    attach_save_methods(model)
