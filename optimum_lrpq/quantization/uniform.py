"""Asymmetric uniform quantization: the formulas only, no state.

    x_int = clamp(round(x / scale + zero_point), 0, 2**bits - 1)
    x_hat = (x_int - zero_point) * scale

`scale` and `zero_point` broadcast against `x`. `zero_point` is kept as a float tensor because the
LayerNorm reparameterization produces a non-integer target zero point (the mean of the per-channel zero
points; RepQ-ViT, arXiv 2212.08254). Rounding *after* adding the zero point makes the per-tensor
grid on reparameterized activations reproduce the per-channel grid exactly; for an integer zero point it is
the same as `round(x / scale) + zero_point`.
"""

from __future__ import annotations

import torch

# Smallest step we allow: a zero-width range (constant or dead channel) would otherwise divide by zero.
MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest integer code for an unsigned `bits`-bit grid."""
    return (1 << bits) - 1


def scale_zero_point_from_range(
    low: torch.Tensor, high: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of the grid that spans [low, high] (elementwise, any shape).

    The range is first widened to contain 0 so that exact zeros (padding, dead channels) stay exact.
    """
    low = torch.minimum(low.float(), torch.zeros_like(low, dtype=torch.float32))
    high = torch.maximum(high.float(), torch.zeros_like(high, dtype=torch.float32))
    scale = ((high - low) / qmax(bits)).clamp_min(MIN_SCALE)
    zero_point = torch.round(-low / scale).clamp(0, qmax(bits))
    return scale, zero_point


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """`round(t)` whose gradient is the identity (straight-through estimator, Bengio et al. 2013)."""
    return t + (torch.round(t) - t).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float tensor, values in [0, 2**bits - 1]).

    Under autograd the rounding is straight-through, so the codes pass gradients to `x` inside the range and, with
    `dequantize`, to `scale` as LSQ's step gradient (Esser et al. 2020): round(x/s) - x/s inside, the clamped code
    minus the zero point outside (block reconstruction learns activation steps this way)."""
    t = x / scale + zero_point
    rounded = round_ste(t) if torch.is_grad_enabled() and t.requires_grad else torch.round(t)
    return torch.clamp(rounded, 0, qmax(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize, computed in float32 and returned in `x.dtype`."""
    xf = x.float()
    if torch.is_grad_enabled() and (xf.requires_grad or scale.requires_grad or zero_point.requires_grad):
        return dequantize(quantize(xf, scale, zero_point, bits), scale, zero_point).to(x.dtype)
    # Inference: the same operations in the same order, in one buffer (activations are large; each new tensor
    # costs an allocation and a pass of page faults). The buffer is contiguous whatever the layout of `x` (q, k, v
    # arrive transposed), so the matmul that reads it needs no copy.
    out = torch.empty(xf.shape, dtype=torch.float32, device=xf.device)
    return _round_trip_(torch.div(xf, scale, out=out), scale, zero_point, bits).to(x.dtype)


def fake_quantize_(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`fake_quantize` in place on a float32 `x` that the caller owns (same operations, same values); returns `x`.

    Not for tensors autograd needs: the caller checks that gradients are off."""
    if x.dtype != torch.float32:
        raise TypeError(f"fake_quantize_ works on float32 tensors, got {x.dtype}.")
    return _round_trip_(x.div_(scale), scale, zero_point, bits)


def _round_trip_(t: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`t` = x / scale onto the grid and back, in place: (clamp(round(t + zero_point)) - zero_point) * scale."""
    return t.add_(zero_point).round_().clamp_(0, qmax(bits)).sub_(zero_point).mul_(scale)


def channel_view_shape(ndim: int, channel_axis: int, channels: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along `channel_axis` of an `ndim`-d tensor."""
    shape = [1] * ndim
    shape[channel_axis] = channels
    return shape
