"""The quantization run (SPEC §3), free of transformers plumbing and of model-specific code.

    prepare (adapter, calibration data) -> [relevance + allocation] -> convert modules -> calibrate
    (observe, reparameterize, quantize weights) -> the bits and scores to record in the config.

The integration floor (`LRPQuantizer`, the load-time quantizer) calls `quantize` and then marks the model as
quantized for transformers; nothing here knows about saving or the Hub.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.utils import logging

from ..configuration import LRPQConfig, lrpq_config_of
from ..kernels import check_backend_name
from ..models import get_adapter
from ..nn import ATTENTION_KEY, is_quantized_module, prepare_kernels, set_kernel_backend
from ..options import RELEVANCE_ALLOCATIONS, SENSITIVITY_ALLOCATIONS
from ..relevance import compute_relevance
from .calibration import calibrate
from .calibration_data import CalibrationSet, prepare_calibration_data
from .conversion import convert_model, converted_copies, plan_layer_bits, restore_model
from .mixed_precision import (
    choose_layer_bits,
    compare_with_uniform,
    prefers_uniform,
    uniform_fallback_ratio,
    unit_sensitivity,
)
from .placement import onload
from .smoothing import (
    AttentionRanges,
    attention_ranges,
    fold_attention_changes,
    ranges_measurable_in_calibration,
    uses_attention_ranges,
)

logger = logging.get_logger(__name__)


@dataclass
class QuantizationResult:
    """What one run decided: the config to record (with `layer_bits` and `relevance` filled in) and its by-products."""

    config: LRPQConfig
    relevance: dict[str, float] | None = None
    # Mix-QViT sensitivity (unit -> {bits: loss increase}), for the sensitivity allocations.
    sensitivity: dict[str, dict[int, float]] | None = None
    # Seconds per stage (relevance, sensitivity, allocation, uniform check, calibration stages).
    timings: dict[str, float] = field(default_factory=dict)
    # `uniform_fallback`: mean KL of the logits on the calibration images, {"allocation": ..., "uniform": ...}.
    uniform_check: dict[str, float] | None = None

    @property
    def layer_bits(self) -> dict[str, dict[str, int]]:
        return self.config.layer_bits


def quantize(model: nn.Module, calibration_data: Any, config: LRPQConfig, *, image_processor: Any = None,
             image_column: str | None = None, show_progress: bool = True) -> QuantizationResult:
    """Quantize `model` in place with `config` (not modified: the result holds a completed copy).

    On any failure (bad input, Ctrl-C) the model is left as it was given.
    """
    config = copy.deepcopy(config)
    config.layer_bits, config.relevance = None, None
    # Everything that can be wrong with the input is checked before the model is modified.
    if lrpq_config_of(model) is not None or any(is_quantized_module(m) for m in model.modules()) or (
            getattr(model, "quantization_method", "lrpq") != "lrpq"):
        raise ValueError("This model is already quantized; quantize the original float model instead.")
    check_backend_name(config.kernel_backend)
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    calibration = prepare_calibration_data(
        calibration_data, model, num_samples=config.num_calibration_samples,
        batch_size=config.calibration_batch_size, image_processor=image_processor, image_column=image_column,
        fixed_image_size=adapter.fixed_image_size, need_labels=_uses_labels(config),
    )
    onload(model)  # accelerate-offloaded weights (device_map with cpu/disk) must be in memory to be rewritten
    was_training = model.training
    model.eval()
    result = QuantizationResult(config)
    ranges = None
    # The attention changes need the q/k/v ranges: measured during calibration's pass where its observations can be
    # corrected after it, else (and for the trials of mixed precision, which need them first) by a float pass now.
    ranges_in_pass = (uses_attention_ranges(config) and not config.mixed_precision
                      and ranges_measurable_in_calibration(config))
    if uses_attention_ranges(config) and not ranges_in_pass:
        start = time.perf_counter()
        ranges = attention_ranges(model, layout, calibration.batches, show_progress=show_progress)
        result.timings["attention_ranges"] = time.perf_counter() - start
    layer_bits = _choose_bits(model, layout, config, calibration, show_progress, result, ranges)
    previous_attention = model.config._attn_implementation
    replaced = convert_model(model, layout, layer_bits, config, skeleton=False)
    try:
        copies = converted_copies(model, replaced)
        if ranges is not None:
            fold_attention_changes(model, layout, ranges, config, copies)
        model.set_attn_implementation(ATTENTION_KEY)
        calibrate(model, layout, config, calibration.batches, show_progress=show_progress, timings=result.timings,
                  fold_attention_into=copies if ranges_in_pass else None)
    except BaseException:
        restore_model(model, replaced)
        model.set_attn_implementation(previous_attention)
        model.train(was_training)
        raise
    set_kernel_backend(model, config.kernel_backend)  # calibration ran on the reference backend
    prepare_kernels(model)
    config.layer_bits = layer_bits
    config.relevance = result.relevance
    config.base_model = config.base_model or getattr(model.config, "_name_or_path", None) or None
    logger.info(f"Quantized {sum(1 for e in layer_bits.values() if 'weight' in e)} weight layers of "
                f"{type(model).__name__} on {calibration.num_images} calibration images.")
    return result


def _uses_labels(config: LRPQConfig) -> bool:
    """Whether the run reads the calibration labels: LRP relevance started at the label."""
    return config.mixed_precision and config.allocation in RELEVANCE_ALLOCATIONS and config.relevance_target == "label"


def _choose_bits(model, layout, config: LRPQConfig, calibration: CalibrationSet, show_progress: bool,
                 result: QuantizationResult,
                 ranges: list[AttentionRanges] | None) -> dict[str, dict[str, int]]:
    bits = plan_layer_bits(layout, config)
    if not config.mixed_precision:
        return bits
    if config.allocation in RELEVANCE_ALLOCATIONS:
        if config.relevance_target == "label" and calibration.labels is None:
            raise ValueError(
                "relevance_target='label' needs labels in the calibration data (a 'label'/'labels' column or "
                "(images, labels) batches); use relevance_target='predicted' otherwise."
            )
        start = time.perf_counter()
        images = calibration.first(config.num_relevance_samples)
        result.relevance = compute_relevance(
            model, images.batches, target=config.relevance_target,
            labels=images.labels if config.relevance_target == "label" else None,
            score=config.relevance_score, rule=config.relevance_rule, show_progress=show_progress,
        )
        result.timings["relevance"] = time.perf_counter() - start
    if config.allocation in SENSITIVITY_ALLOCATIONS:
        start = time.perf_counter()
        result.sensitivity = unit_sensitivity(model, layout, config, bits, calibration, show_progress, ranges)
        result.timings["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    uniform = bits
    bits = choose_layer_bits(model, layout, config, uniform, calibration, result.relevance, result.sensitivity)
    result.timings["allocation"] = time.perf_counter() - start
    if config.uniform_fallback and bits != uniform:
        start = time.perf_counter()
        result.uniform_check = compare_with_uniform(model, layout, config, bits, uniform, calibration, ranges)
        result.timings["uniform_check"] = time.perf_counter() - start
        allocation_kl, uniform_kl = result.uniform_check["allocation"], result.uniform_check["uniform"]
        ratio = uniform_fallback_ratio(config.weight_bits, config.activation_bits)
        if prefers_uniform(result.uniform_check, ratio):
            logger.warning(
                f"Mixed precision: the {config.allocation!r} allocation diverges more from the float model "
                f"on the calibration images (mean KL of the logits {allocation_kl:.4g}) than uniform "
                f"W{config.weight_bits}A{config.activation_bits} ({uniform_kl:.4g}); keeping uniform bits. Pass "
                "uniform_fallback=False to keep the allocation."
            )
            return uniform
    return bits
