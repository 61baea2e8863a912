"""Mix-QViT's second criterion: per-unit quantization sensitivity, measured one allocation unit at a time.

For every allocation unit (see `mixed_precision.allocation_units`: a LayerNorm group such as q/k/v with its shared
input quantizer, or a single linear such as o_proj, fc2 or a head) and every candidate bit width b, only that unit
is quantized at b bits, exactly as the pipeline would quantize it (weights per output channel, its input
activations, the reparameterization of a LayerNorm group, and for a q/k/v unit the attention operands q, k, v and
probabilities of its block); every other layer stays in floating point. The loss increase is measured on a few
calibration images against the float model's logits:

    S_unit(b) = mean over images of KL(softmax(float logits) || softmax(quantized logits))   ("kl", in nats)
              or mean squared difference of the logits                                        ("mse")

Nothing new is computed here: the unit is converted with `conversion.convert_model` (a one-unit `layer_bits`),
calibrated with `calibration.calibrate` on the same images, evaluated, and restored with `conversion.restore_model`
(the converted modules are copies, so the float model is left bit-for-bit unchanged).

The table is made non-increasing in b (a wider grid is never counted as worse; the raw values of nearly lossless
widths are noise) and non-negative, so that it can be passed to `allocation.allocate_bits(sensitivity=...)`.

Cost: two forward passes over the images (observation, then evaluation) per unit and candidate, i.e. about
2 × units × candidates forwards of `num_sensitivity_samples` images (e.g. 2 × 49 × 4 for a 12-block ViT). Measured
on 1 CPU thread at W4A4 (8 images): DINOv2-S at 112 px 108 s = 406 float forwards of those 8 images (≈100x a
32-image calibration forward; the LRP relevance pass took 2.6 s); the 4-block benchmark DeiT/Swin 1-1.5 s (≈160-190x).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import SENSITIVITY_METRICS, LRPQConfig
from ..models import ModelLayout
from ..nn import ATTENTION_KEY
from .calibration import calibrate
from .conversion import convert_model, converted_copies, restore_model
from .placement import model_device_and_dtype
from .smoothing import AttentionRanges, fold_attention_changes
from .units import unit_layer_bits

logger = logging.get_logger(__name__)

# Stands in for a non-finite loss (the quantized unit produced NaN/Inf logits): "never choose this width".
NON_FINITE_LOSS = 1e6


def _check_metric(metric: str) -> None:
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"sensitivity metric must be one of {list(SENSITIVITY_METRICS)}, got {metric!r}.")


def logit_loss(quantized: torch.Tensor, reference: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-image loss of `quantized` logits against the float `reference` logits, shape [batch]."""
    _check_metric(metric)
    quantized, reference = quantized.double(), reference.double()
    if metric == "kl":
        log_p = torch.log_softmax(reference, dim=-1)
        log_q = torch.log_softmax(quantized, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (quantized - reference).pow(2).mean(-1)  # "mse"


def monotone_table(raw: dict[int, float]) -> dict[int, float]:
    """Non-negative and non-increasing in the bit width: S(b) = max(0, min over b' <= b of raw S(b'))."""
    out, best = {}, math.inf
    for bits in sorted(raw):
        value = raw[bits]
        if not math.isfinite(value):
            value = NON_FINITE_LOSS
        best = min(best, max(0.0, value))
        out[bits] = best
    return out


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def calibration_only(config: LRPQConfig) -> LRPQConfig:
    """`config` without block reconstruction: trial quantizations are calibrated only (seconds, not minutes)."""
    if config.reconstruction is None:
        return config
    config = copy.copy(config)
    config.reconstruction = None
    return config


@contextlib.contextmanager
def trial_mode(model: nn.Module, batches: list[torch.Tensor]):
    """Put the float `model` in eval mode with the lrpq attention function (eager; quantizers only where attached)
    for trial quantizations; yields the batches on the model's device and dtype and the float logits of each.
    Restores the attention implementation and the training flag on exit. The calibration's warnings (e.g. too
    few tokens for per-channel ranges) are held back meanwhile: the real calibration gives them once."""
    device, dtype = model_device_and_dtype(model)
    batches = [b.to(device=device, dtype=dtype) for b in batches]
    previous_attention = model.config._attn_implementation
    was_training = model.training
    calibration_logger = logging.get_logger(calibrate.__module__)
    previous_level = calibration_logger.level
    model.eval()
    model.set_attn_implementation(ATTENTION_KEY)
    calibration_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            reference = [_logits(model(pixel_values=b)).float() for b in batches]
        yield batches, reference
    finally:
        calibration_logger.setLevel(previous_level)
        model.set_attn_implementation(previous_attention)
        model.train(was_training)


@torch.no_grad()
def trial_loss(model: nn.Module, layout: ModelLayout, config: LRPQConfig, layer_bits: dict[str, dict[str, int]],
               batches: list[torch.Tensor], reference: list[torch.Tensor], metric: str,
               ranges: list[AttentionRanges] | None = None) -> float:
    """Mean per-image `logit_loss` against the float `reference` logits of `model` quantized with `layer_bits`
    (converted, calibrated on `batches`, evaluated, then restored: the float model is unchanged on return).

    `ranges` (`smoothing.attention_ranges` of the float model) makes the trial centre / smooth its converted layers
    as the final quantization does (`smoothing.fold_attention_changes`). Run it inside `trial_mode`."""
    replaced = convert_model(model, layout, layer_bits, config, skeleton=False)
    try:
        if ranges is not None:
            fold_attention_changes(model, layout, ranges, config, converted_copies(model, replaced))
        calibrate(model, layout, config, batches, show_progress=False)
        total = sum(float(logit_loss(_logits(model(pixel_values=b)).float(), ref, metric).sum())
                    for b, ref in zip(batches, reference, strict=True))
    finally:
        restore_model(model, replaced)
    return total / sum(b.shape[0] for b in batches)


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layout: ModelLayout,
    config: LRPQConfig,
    units: list,
    uniform_bits: dict[str, dict[str, int]],
    batches: list[torch.Tensor],
    candidate_bits: list[int],
    *,
    metric: str = "kl",
    show_progress: bool = True,
    ranges: list[AttentionRanges] | None = None,
) -> dict[str, dict[int, float]]:
    """``{unit name: {bits: loss increase}}`` with only that unit quantized at ``bits`` (see the module docstring).

    Args:
        model: the float model (unchanged on return, also on error).
        layout: its layout.
        config: quantizer settings used for the unit (ranges, reparameterization, clipping, softmax quantizer).
        units: allocation units (`mixed_precision.allocation_units`).
        uniform_bits: the uniform plan (`conversion.plan_layer_bits`), telling which modules are quantized at all.
        batches: pixel-value batches to calibrate the unit on and to measure the loss on.
        candidate_bits: the widths to measure.
        metric: "kl" or "mse" (see `logit_loss`).
        show_progress: tqdm progress bar.
        ranges: the float model's attention ranges, to centre / smooth each trial as the quantization does.
    """
    _check_metric(metric)  # before any work
    if not batches:
        raise ValueError("measure_sensitivity needs at least one batch of images.")
    config = calibration_only(config)  # per-unit reconstruction would cost minutes per job
    raw: dict[str, dict[int, float]] = {unit.name: {} for unit in units}
    with trial_mode(model, batches) as (images, reference):
        jobs = [(unit, bits) for unit in units for bits in sorted(set(candidate_bits))]
        for unit, bits in tqdm(jobs, desc="Sensitivity", unit="config", disable=not show_progress):
            loss = trial_loss(model, layout, config, unit_layer_bits(unit, layout, uniform_bits, bits, bits),
                              images, reference, metric, ranges)
            if not math.isfinite(loss):
                logger.warning(f"Quantizing {unit.name} alone at {bits} bits gives non-finite logits; its "
                               f"sensitivity at {bits} bits is set to {NON_FINITE_LOSS:g}.")
            raw[unit.name][bits] = loss
    return {name: monotone_table(row) for name, row in raw.items()}
