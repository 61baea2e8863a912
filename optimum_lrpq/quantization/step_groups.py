"""Step groups: per-channel activation steps constrained to a few distinct values.

An integer GEMM (u8 activations x s8 weights) factors one activation step out of a dot product, so a grid with one
step per input channel runs as one integer GEMM per group of channels that share a step (the zero points may differ
per channel: their term is a per-channel constant times the weight column sums, corrected exactly). `group_steps`
rounds each channel's step *up* to one of `groups` geometric levels anchored at the largest step,

    level_g = s_max / ratio**g,  g = 0 .. groups - 1,

so no channel gets a finer step than its calibration chose (its range still fits, no extra clipping); channels finer
than the last level take the last level. `zero_points_for_steps` places each channel's range on its new step with the
zero-point formula of `uniform.scale_zero_point_from_range`.
"""

from __future__ import annotations

import numbers

import torch

from .uniform import qmax


def step_levels(largest: torch.Tensor, groups: int, ratio: float = 2.0) -> torch.Tensor:
    """[groups] descending levels largest / ratio**g (float32; exact powers of two for ratio 2)."""
    _check(groups, ratio)
    exponents = torch.arange(groups, dtype=torch.float64)
    return (largest.double() / torch.pow(torch.tensor(float(ratio), dtype=torch.float64), exponents)).float()


def group_steps(scale: torch.Tensor, groups: int, ratio: float = 2.0) -> torch.Tensor:
    """`scale` (positive steps, any shape) with each step replaced by the smallest level >= it (see module doc).

    The result takes at most `groups` distinct values, is elementwise >= `scale` (float32), keeps the largest step,
    and is a fixed point: grouping it again changes nothing. `groups=1` gives every channel the largest step.
    """
    _check(groups, ratio)
    if scale.numel() == 0:
        return scale.float().clone()
    steps = scale.detach().float()
    if not bool(torch.isfinite(steps).all()) or not bool((steps > 0).all()):
        raise ValueError("group_steps needs finite positive steps.")
    flat = steps.reshape(-1)
    levels = step_levels(flat.max(), groups, ratio).to(flat.device)
    # Levels are descending and level 0 is the largest step itself, so at least one level is >= every step; the
    # last level >= a step is the smallest one. A comparison (no logarithm) keeps "never finer" exact in float32.
    fits = (levels[None, :] >= flat[:, None]).sum(dim=1)
    return levels[fits - 1].reshape(steps.shape)


def zero_points_for_steps(low: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points of grids with steps `scale` whose lowest level sits at the range's low end `low` (elementwise).

    The formula of `uniform.scale_zero_point_from_range`: the range is widened to contain 0, then
    zero_point = clamp(round(-low / scale), 0, 2**bits - 1).
    """
    low = torch.minimum(low.float(), torch.zeros_like(low, dtype=torch.float32))
    return torch.round(-low / scale.float()).clamp(0, qmax(bits))


def _check(groups: int, ratio: float) -> None:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}.")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 1.0:
        raise ValueError(f"ratio must be a number > 1, got {ratio!r}.")
