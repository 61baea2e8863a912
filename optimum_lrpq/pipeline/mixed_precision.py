"""Mixed precision: per-layer scores (LRP relevance or a baseline) + budgets -> `layer_bits`.

Bits are chosen per allocation unit (`units.py`: layers that share an input quantizer); a unit's cost and score are
the sums of its layers'.

Scores. "lrp" passes the relevance as whole-unit totals (`allocate_bits(scores_are_totals=True)`): relevance is the
share of the prediction flowing through the tensors a unit quantizes, whatever the unit's size, so bits follow
relevance per unit of budget. "magnitude" scores are per-weight noise powers and the sensitivity allocations carry a
measured table; they keep the per-element form.

The patch embedding keeps `weight_bits` weights and its `patch_embedding_input_bits` input (RepQ-ViT keeps the
image at 8 bits) and is left out of the budgets, which apply to every other quantized layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import LayerCost, allocate_bits, random_bits
from ..configuration import LRPQConfig
from ..models import ModelLayout
from ..options import RELEVANCE_ALLOCATIONS, SENSITIVITY_ALLOCATIONS
from .calibration_data import CalibrationSet
from .sensitivity import calibration_only, measure_sensitivity, trial_loss, trial_mode
from .smoothing import AttentionRanges
from .units import Unit, allocation_units, unit_layer_bits


def default_candidates(budget: int) -> list[int]:
    """One bit below to two above the budget, within 2..8 (e.g. 3-6 around 4, 5-8 around 6)."""
    return list(range(max(2, budget - 1), min(8, budget + 2) + 1))


@torch.no_grad()
def layer_macs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each named Linear/Conv2d, measured with one forward pass."""
    macs: dict[str, int] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def record(mod, inputs, output, name=name):
            per_image = output.numel() // output.shape[0]
            fan_in = mod.weight.numel() // mod.weight.shape[0]
            macs[name] = int(per_image * fan_in)

        hooks.append(module.register_forward_hook(record))
    try:
        model(pixel_values=example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def magnitude_scores(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Weight-magnitude baseline: mean squared per-row weight range (quantization noise ∝ range² · 4^(−b))."""
    scores = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach().float()
        rows = weight.reshape(weight.shape[0], -1)
        scores[name] = float(((rows.amax(1) - rows.amin(1)) ** 2).mean())
    return scores


def candidate_bits(config: LRPQConfig) -> list[int]:
    """The widths the allocation chooses from: `config.candidate_bits`, or the defaults around both budgets."""
    return config.candidate_bits or sorted(
        set(default_candidates(config.weight_bits)) | set(default_candidates(config.activation_bits))
    )


def unit_sensitivity(
    model: nn.Module,
    layout: ModelLayout,
    config: LRPQConfig,
    uniform_bits: dict[str, dict[str, int]],
    calibration: CalibrationSet,
    show_progress: bool = True,
    ranges: list[AttentionRanges] | None = None,
) -> dict[str, dict[int, float]]:
    """Mix-QViT sensitivity table ``unit -> {bits: loss increase}`` on the first `num_sensitivity_samples` images
    (`ranges`: see `sensitivity.trial_loss`)."""
    images = calibration.first(config.num_sensitivity_samples)
    return measure_sensitivity(model, layout, config, allocation_units(layout, uniform_bits), uniform_bits,
                               images.batches, candidate_bits(config), metric=config.sensitivity_metric,
                               show_progress=show_progress, ranges=ranges)


def choose_layer_bits(
    model: nn.Module,
    layout: ModelLayout,
    config: LRPQConfig,
    uniform_bits: dict[str, dict[str, int]],
    calibration: CalibrationSet,
    relevance: dict[str, float] | None,
    sensitivity: dict[str, dict[int, float]] | None = None,
) -> dict[str, dict[str, int]]:
    """Per-layer bits under the budgets `config.weight_bits` / `config.activation_bits`.

    `relevance` (per layer) is needed by the "lrp" allocations, `sensitivity` (per unit, see `unit_sensitivity`) by
    the sensitivity allocations.
    """
    units = allocation_units(layout, uniform_bits)
    layers = [layer for unit in units for layer in unit.layers]
    macs = layer_macs(model, layers, calibration.batches[0])
    costs = [
        LayerCost(unit.name, sum(model.get_submodule(n).weight.numel() for n in unit.layers),
                  sum(macs[n] for n in unit.layers))
        for unit in units
    ]
    couple = config.weight_bits == config.activation_bits
    candidates = candidate_bits(config)
    if config.allocation == "uniform":
        return uniform_bits
    if config.allocation == "random":
        allocation = random_bits(costs, weight_budget=config.weight_bits, activation_budget=config.activation_bits,
                                 candidate_bits=candidates, seed=config.seed, couple=couple)
    else:
        if config.allocation == "sensitivity":
            scores = dict.fromkeys((unit.name for unit in units), 1.0)  # no relevance: the measurement decides
        else:
            if config.allocation in RELEVANCE_ALLOCATIONS:
                if relevance is None:
                    raise ValueError(f"allocation={config.allocation!r} needs the LRP relevance of every layer.")
                per_layer = relevance
            else:
                per_layer = magnitude_scores(model, layers)
            scores = {unit.name: sum(per_layer[n] for n in unit.layers) for unit in units}
        table = None
        if config.allocation in SENSITIVITY_ALLOCATIONS:
            if sensitivity is None:
                raise ValueError(f"allocation={config.allocation!r} needs the measured sensitivity of every unit.")
            table = {unit.name: sensitivity[unit.name] for unit in units}
        allocation = allocate_bits(scores, costs, weight_budget=config.weight_bits,
                                   activation_budget=config.activation_bits, candidate_bits=candidates, couple=couple,
                                   sensitivity=table, sensitivity_weight=config.sensitivity_weight,
                                   scores_are_totals=config.allocation == "lrp")
    return _expand(allocation, units, layout, uniform_bits)


def _expand(allocation, units: list[Unit], layout: ModelLayout, uniform_bits) -> dict[str, dict[str, int]]:
    bits = {name: dict(entry) for name, entry in uniform_bits.items()}
    for unit in units:
        w, a = allocation[unit.name]
        bits.update(unit_layer_bits(unit, layout, uniform_bits, int(w), int(a)))
    return bits


# `uniform_fallback` keeps uniform bits only when their calibration KL is below this share of the allocation's: on
# the real-weight DeiT at W6A6, where uniform bits won on the test digits in every draw, the ratio was 0.45-0.58; in
# a DeiT W4A4 draw at 0.95 the allocation won by 7.5 points (a heuristic margin from these few draws, see
# benchmarks/README.md; on the demo's tiny ViT a ratio of 0.45 went with a 0.2-point loss).
UNIFORM_FALLBACK_RATIO = 2 / 3
# From budgets of this many bits (weights and activations) on, uniform bits are kept whenever their KL is lower: they
# are within about a point of float there, so the allocation has little to gain; with centred keys and values, mixed
# W6A6 kept allocations at ratios 0.91-0.92 that lost 0.5 (DINOv2-S) and 1.5 points (the real-weight DeiT) to uniform
# on the test digits.
HIGH_BUDGET_BITS = 6


def uniform_fallback_ratio(weight_bits: int, activation_bits: int) -> float:
    """The share of the allocation's KL that uniform bits must stay below to be kept, for these budgets."""
    return 1.0 if min(weight_bits, activation_bits) >= HIGH_BUDGET_BITS else UNIFORM_FALLBACK_RATIO


def prefers_uniform(check: dict[str, float], ratio: float = UNIFORM_FALLBACK_RATIO) -> bool:
    """Whether the `compare_with_uniform` result says to keep uniform bits: closer to the float model by `ratio`."""
    return check["uniform"] < ratio * check["allocation"]


def compare_with_uniform(model: nn.Module, layout: ModelLayout, config: LRPQConfig,
                         layer_bits: dict[str, dict[str, int]], uniform_bits: dict[str, dict[str, int]],
                         calibration: CalibrationSet,
                         ranges: list[AttentionRanges] | None = None) -> dict[str, float]:
    """The calibration images' mean KL divergence of the quantized logits from the float model's, for the mixed
    allocation `layer_bits` and for uniform bits: ``{"allocation": kl, "uniform": kl}`` (`uniform_fallback`).

    Each plan is quantized on a converted copy of the layers (calibration only, no reconstruction) and then removed:
    the float `model` is unchanged on return. Costs two calibrations plus three forward passes of the images (the
    float logits, then each plan's). `ranges`: see `sensitivity.trial_loss`."""
    trial_config = calibration_only(config)
    with trial_mode(model, calibration.batches) as (images, reference):
        return {label: trial_loss(model, layout, trial_config, bits, images, reference, "kl", ranges)
                for label, bits in (("allocation", layer_bits), ("uniform", uniform_bits))}
