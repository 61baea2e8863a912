"""Dispatch a range-estimation method name (as written in `LRPQConfig`) to its implementation."""

from __future__ import annotations

import torch

from . import ranges


def estimate_range(x: torch.Tensor, bits: int, channel_axis: int | None, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for `x`, shaped to broadcast against it."""
    if method == "minmax":
        return ranges.minmax_range(x, bits, channel_axis=channel_axis)
    if method == "percentile_mse":
        return ranges.search_range(x, bits, channel_axis=channel_axis)
    if method == "mse":
        return ranges.mse_range(x, bits, channel_axis=channel_axis)
    raise ValueError(f"Unknown range method {method!r}; use 'minmax', 'percentile_mse' or 'mse'.")
