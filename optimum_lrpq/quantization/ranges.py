"""Range estimation: choose (scale, zero_point) for a tensor, per tensor or per channel.

Pure functions over tensors. `channel_axis=None` means one range for the whole tensor; otherwise one
range per index along `channel_axis` (all other axes are reduced).
"""

from __future__ import annotations

import torch

from .uniform import channel_view_shape, scale_zero_point_from_range


def _flatten_channels(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """[C, M] view with one row per channel (C = 1 for per-tensor)."""
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def minmax_range(x: torch.Tensor, bits: int, channel_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid spanning the observed min and max. Returns scale, zero_point shaped to broadcast with `x`."""
    rows = _flatten_channels(x.detach().float(), channel_axis)
    scale, zero_point = scale_zero_point_from_range(rows.amin(dim=1), rows.amax(dim=1), bits)
    return _reshape(scale, zero_point, x, channel_axis)


def _reshape(scale, zero_point, x, channel_axis):
    if channel_axis is None:
        return scale.reshape([]), zero_point.reshape([])
    shape = channel_view_shape(x.ndim, channel_axis, x.shape[channel_axis])
    return scale.reshape(shape), zero_point.reshape(shape)
