"""Logarithmic quantization of post-softmax probabilities (values in [0, 1]): the formulas only, no state.

log√2 (sqrt2=True, RepQ-ViT) and plain log2 (sqrt2=False), with k = 2 and k = 1 respectively:

    q     = clamp(round(-k * log2(x / scale)), 0, 2**bits - 1)     # level index; level 0 is `scale` itself
    x_hat = scale * 2**(-q / k)                                    # 0 where the unclamped q >= 2**bits

Values above `scale` saturate to it. Values below the smallest level (underflow, including 0 and, defensively,
negative inputs) dequantize to exactly 0; their code is `zero_code(bits)` = 2**bits. So, as in RepQ-ViT, the
quantizer has 2**bits non-zero levels plus zero: an integer kernel storing exactly `bits` bits must give up one level.
See RepQ-ViT (arXiv 2212.08254), its log√2 quantizer.
"""

from __future__ import annotations

import math

import torch


def zero_code(bits: int) -> int:
    """The code that means "exactly zero" (underflow): one past the last level."""
    return 1 << bits


def _log_steps(sqrt2: bool) -> float:
    """Levels per octave: 2 for log√2, 1 for log2."""
    return 2.0 if sqrt2 else 1.0


def log_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """Level codes as a float32 tensor: values in [0, 2**bits - 1], or `zero_code(bits)` for underflow."""
    q = x.float() / scale
    q.log2_().mul_(-_log_steps(sqrt2)).round_()
    # log2(0) = -inf gives q = +inf and log2(negative) gives NaN: both are underflow. q = -inf (x / scale = +inf)
    # saturates like any value above `scale`.
    q.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf).clamp_(0, zero_code(bits))
    return q


def log_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """scale * 2**(-q / k), and 0 for the zero code (direct form)."""
    codes = codes.float()
    # codes * (-1/k) equals codes / -k exactly (k is 1 or 2); in place: one buffer for exp2(...) * scale
    values = codes * (-1.0 / _log_steps(sqrt2))
    if torch.is_grad_enabled() and values.requires_grad:
        values = torch.exp2(values) * scale  # exp2's backward reads its output: not in place
    else:
        values.exp2_().mul_(scale)
    return values.masked_fill_(codes >= zero_code(bits), 0.0)


def log_dequantize_shift(codes: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """Same numbers as `log_dequantize`, written as a hardware would compute them.

    log√2: scale * 2**(-ceil(q/2)) * (1 + (√2 - 1) * [q odd]), i.e. a right shift by ceil(q/2) plus one constant √2
    factor on odd levels (two shift-accumulators, the odd one multiplied once by √2). log2: scale * 2**(-q).
    """
    codes = codes.float()
    if sqrt2:
        odd = torch.remainder(codes, 2.0)
        values = torch.exp2(-torch.ceil(codes / 2)) * (1 + (math.sqrt(2) - 1) * odd) * scale
    else:
        values = torch.exp2(-codes) * scale
    return values.masked_fill_(codes >= zero_code(bits), 0.0)


def log_fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """Quantize then dequantize, computed in float32 and returned in `x.dtype`.

    Under autograd the gradient passes straight through to `x` (the levels are a step function of x); `scale` is
    not learned."""
    if torch.is_grad_enabled() and x.requires_grad:
        with torch.no_grad():
            quantized = log_dequantize(log_quantize(x, scale, bits, sqrt2), scale, bits, sqrt2).to(x.dtype)
        return x + (quantized - x.detach())
    return log_dequantize(log_quantize(x, scale, bits, sqrt2), scale, bits, sqrt2).to(x.dtype)


def log_fake_quantize_(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """`log_fake_quantize` in place on a float32 `x` (the same operations in the same order, so the same values):
    no temporary as large as `x`, which matters for attention probabilities ([batch, heads, tokens, tokens]).

    The zero code is told apart by its value instead of a mask: it dequantizes to scale * 2**(-2**bits / k), a
    factor >= √2 below the smallest level, so a threshold halfway between them (in the log domain) zeroes exactly
    the underflow codes."""
    if x.dtype != torch.float32:
        raise TypeError(f"log_fake_quantize_ works on float32 tensors, got {x.dtype}.")
    k = _log_steps(sqrt2)
    x.div_(scale).log2_().mul_(-k).round_()
    x.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf).clamp_(0, zero_code(bits))
    x.mul_(-1.0 / k).exp2_().mul_(scale)
    # halfway (in the log domain) between the zero code's value and the last level's
    between = (scale.double() * 2.0 ** (-(zero_code(bits) - 0.5) / k)).float()
    if between.numel() == 1:
        return torch.nn.functional.threshold_(x, float(between), 0.0)
    return x.masked_fill_(x <= between, 0.0)
