"""Calibration: observe activations, reparameterize post-LayerNorm grids, quantize weights, fix all grids.

Operates on a model already converted with `conversion.convert_model(..., skeleton=False)`.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .configuration import LRPQConfig
from .models import ModelLayout
from .nn import LogQuantizer, PackedWeightLayer, QuantLayerNorm, UniformQuantizer
from .observers import ActivationObserver
from .quantization.clipping import clip_channel_scales
from .quantization.reparameterization import reparameterize

logger = logging.get_logger(__name__)


def attach_observers(model: nn.Module, config: LRPQConfig, num_batches: int) -> list[ActivationObserver]:
    observers = []
    layernorm_quants = {id(m.out_quant) for m in model.modules() if isinstance(m, QuantLayerNorm)}
    for index, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, (UniformQuantizer, LogQuantizer)):
            per_channel = isinstance(module, UniformQuantizer) and module.per_channel
            keep = config.activation_range != "minmax" or (
                config.clipping == "ccq_a" and id(module) in layernorm_quants
            )
            module.observer = ActivationObserver(name, per_channel, config.activation_range, num_batches,
                                                 seed=config.seed + index, keep_samples=keep)
            observers.append(module.observer)
    return observers


def layernorm_grid(quant: UniformQuantizer, config: LRPQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel grid of a post-LayerNorm quantizer, with the configured clipping (CCQ) applied."""
    clip_percentile = config.clipping_percentile if config.clipping == "ccq_a" else None
    scale, zero_point = quant.observer.uniform_grid(quant.bits, clip_percentile=clip_percentile)
    if config.clipping == "ccq_b":
        scale = clip_channel_scales(scale, config.clipping_ratio)
    return scale, zero_point


@torch.no_grad()
def run_batches(model: nn.Module, batches: list[torch.Tensor], description: str, show_progress: bool = True) -> None:
    device, dtype = _device_and_dtype(model)
    for batch in tqdm(batches, desc=description, unit="batch", disable=not show_progress):
        model(pixel_values=batch.to(device=device, dtype=dtype))


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def set_layernorm_grids(model: nn.Module, layout: ModelLayout, config: LRPQConfig) -> None:
    """Fix each quantized LayerNorm's output grid; with `reparameterize`, fold it into the affine and consumers."""
    for group in layout.groups:
        layernorm = model.get_submodule(group.layernorm)
        if not isinstance(layernorm, QuantLayerNorm):
            continue
        quant = layernorm.out_quant
        scale, zero_point = layernorm_grid(quant, config)
        quant.observer = None
        if not config.reparameterize:
            quant.set_grid(scale, zero_point)
            continue
        consumers = [model.get_submodule(name) for name in group.consumers]
        result = reparameterize(scale, zero_point, layernorm.weight.data, layernorm.bias.data,
                                [c.weight.data for c in consumers], [c.bias.data if c.bias is not None else None
                                                                     for c in consumers])
        layernorm.weight.data.copy_(result.layernorm_weight)
        layernorm.bias.data.copy_(result.layernorm_bias)
        for consumer, weight, bias in zip(consumers, result.linear_weights, result.linear_biases):
            consumer.weight.data.copy_(weight)
            consumer.bias.data.copy_(bias)
        quant.set_grid(result.scale, result.zero_point)


def finalize_activation_grids(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, UniformQuantizer) and module.observer is not None:
            observer = module.observer
            if not observer.per_channel and bool((observer.high - observer.low).abs().max() == 0):
                logger.warning(
                    f"{observer.name} saw a constant input ({observer.low.item():g}) during calibration, so its grid "
                    "only represents that value. Calibrate on more varied images if this layer matters."
                )
            scale, zero_point = module.observer.uniform_grid(module.bits)
            module.set_grid(scale, zero_point)
            module.observer = None
        elif isinstance(module, LogQuantizer) and module.observer is not None:
            module.set_grid(module.observer.log_scale(module.bits, module.sqrt2))
            module.observer = None


def freeze_weights(model: nn.Module, range_method: str) -> None:
    for module in model.modules():
        if isinstance(module, PackedWeightLayer) and not module.is_frozen:
            module.freeze(range_method)


def calibrate(model: nn.Module, layout: ModelLayout, config: LRPQConfig, batches: list[torch.Tensor],
              show_progress: bool = True, timings: dict[str, float] | None = None) -> None:
    """One observation pass, reparameterization, then weights and activation grids are fixed.

    `timings`, if given, receives the seconds spent in each stage.
    """
    timings = {} if timings is None else timings
    attach_observers(model, config, len(batches))
    try:
        start = time.perf_counter()
        run_batches(model, batches, "Calibrating", show_progress)
        timings["calibration_pass"] = time.perf_counter() - start
        start = time.perf_counter()
        set_layernorm_grids(model, layout, config)
        freeze_weights(model, config.weight_range)
        finalize_activation_grids(model)
        timings["grids_and_weights"] = time.perf_counter() - start
    finally:
        for module in model.modules():
            if isinstance(module, (UniformQuantizer, LogQuantizer)):
                module.observer = None
