"""Logarithmic quantization of post-softmax probabilities (values in [0, 1]): the formulas only, no state.

log√2 (sqrt2=True, RepQ-ViT) and plain log2 (sqrt2=False), with k = 2 and k = 1 respectively:

    q     = clamp(round(-k * log2(x / scale)), 0, 2**bits - 1)     # level index; level 0 is `scale` itself
    x_hat = scale * 2**(-q / k)                                    # 0 where the unclamped q >= 2**bits

Values above `scale` saturate to it. Values below the smallest level (underflow, including 0 and, defensively,
negative inputs) dequantize to exactly 0; their code is `zero_code(bits)` = 2**bits. So, as in RepQ-ViT, the
quantizer has 2**bits non-zero levels plus zero: an integer kernel storing exactly `bits` bits must give up one level.
See RepQ-ViT (arXiv 2212.08254), its log√2 quantizer.

Up to `BIT_PATTERN_UP_TO_BITS` the rounding in the log domain is done on float32 bit patterns (exact: no float32 lies
on a level boundary), log√2's on x² (round(2 log2 t) = round(log2 t²)): cheaper than log2 / exp2, and the same
function in every path that quantizes probabilities (calibration, the reference attention, the in-place one).
"""

from __future__ import annotations

import math

import torch

# Up to this many bits the levels are found from float32 bit patterns; above it with float log2 / exp2 (their levels
# reach below float32's normal range: 2**-127 for 7-bit log2, 2**-127.5 for 8-bit log√2).
BIT_PATTERN_UP_TO_BITS = 6
_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127
_SIGN_AND_EXPONENT = -(1 << _MANTISSA_BITS)  # int32 0xFF800000
# The mantissa field of the smallest float32 above √2 (1.41421366; the one below it, 0x3FB504F3, is 1.41421354).
_ROUND_UP = (1 << _MANTISSA_BITS) - 0x3504F4


def zero_code(bits: int) -> int:
    """The code that means "exactly zero" (underflow): one past the last level."""
    return 1 << bits


def _log_steps(sqrt2: bool) -> float:
    """Levels per octave: 2 for log√2, 1 for log2."""
    return 2.0 if sqrt2 else 1.0


def log_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """Level codes as a float32 tensor: values in [0, 2**bits - 1], or `zero_code(bits)` for underflow."""
    if bits > BIT_PATTERN_UP_TO_BITS:
        return _float_log_quantize(x, scale, bits, sqrt2)
    t = _nearest_power_of_two_(_to_level_domain_(x.float() / scale.float(), sqrt2))
    # t = 2**-q (or 0): q from its exponent field; 0, -0.0 and subnormals give q >= 127, the zero code after clamping
    codes = torch.bitwise_right_shift(t.view(torch.int32), _MANTISSA_BITS).neg_().add_(_EXPONENT_BIAS)
    return codes.clamp_(0, zero_code(bits)).float()


def log_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = True) -> torch.Tensor:
    """scale * 2**(-q / k), and 0 for the zero code (direct form)."""
    if bits > BIT_PATTERN_UP_TO_BITS:
        return _float_log_dequantize(codes, scale, bits, sqrt2)
    codes = codes.float()
    # exp2 of an integer is exact; log√2's half powers are square roots of whole ones (as `log_fake_quantize_`)
    levels = torch.exp2(-codes)
    if sqrt2:
        levels.sqrt_()
    return levels.mul_(scale).masked_fill_(codes >= zero_code(bits), 0.0)


def _float_log_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool) -> torch.Tensor:
    q = x.float() / scale
    q.log2_().mul_(-_log_steps(sqrt2)).round_()
    # log2(0) = -inf gives q = +inf and log2(negative) gives NaN: both are underflow. q = -inf (x / scale = +inf)
    # saturates like any value above `scale`.
    q.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf).clamp_(0, zero_code(bits))
    return q


def _float_log_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool) -> torch.Tensor:
    codes = codes.float()
    # codes * (-1/k) equals codes / -k exactly (k is 1 or 2); in place: one buffer for exp2(...) * scale
    values = codes * (-1.0 / _log_steps(sqrt2))
    if torch.is_grad_enabled() and values.requires_grad:
        values = torch.exp2(values) * scale  # exp2's backward reads its output: not in place
    else:
        values.exp2_().mul_(scale)
    return values.masked_fill_(codes >= zero_code(bits), 0.0)


def _to_level_domain_(t: torch.Tensor, sqrt2: bool) -> torch.Tensor:
    """x / scale (float32, owned) clamped to [0, 1], squared for log√2 (round(2 log2 t) = round(log2 t**2)), in
    place. NaN stays NaN (`_nearest_power_of_two_` turns it into 0)."""
    t.clamp_(0.0, 1.0)
    return t.mul_(t) if sqrt2 else t


def _nearest_power_of_two_(t: torch.Tensor) -> torch.Tensor:
    """2**round(log2 t) in place, for float32 t in [0, 1] or NaN, from its bit pattern: adding 2**23 - M to the bits
    carries into the exponent exactly when the mantissa is >= M, the smallest float32 mantissa above √2's, and
    clearing the mantissa leaves the power of two. Exact (√2 is irrational: no float32 lies on a boundary), and no
    log2 / exp2 pass. 0 and subnormals give 0 or 2**-126, far below any level. NaN (its quiet bit makes the
    mantissa >= M) overflows int32 into the sign bit: -0.0 or 0, i.e. underflow, as in the float formulas."""
    t.view(torch.int32).add_(_ROUND_UP).bitwise_and_(_SIGN_AND_EXPONENT)
    return t


def _float_log_fake_quantize_(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool) -> torch.Tensor:
    k = _log_steps(sqrt2)
    x.div_(scale).log2_().mul_(-k).round_()
    x.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf).clamp_(0, zero_code(bits))
    x.mul_(-1.0 / k).exp2_().mul_(scale)
    # halfway (in the log domain) between the zero code's value and the last level's
    between = (scale.double() * 2.0 ** (-(zero_code(bits) - 0.5) / k)).float()
    if between.numel() == 1:
        return torch.nn.functional.threshold_(x, float(between), 0.0)
    return x.masked_fill_(x <= between, 0.0)


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
    """`log_fake_quantize` in place on a float32 `x` (the same values): no temporary as large as `x`, which matters
    for attention probabilities ([batch, heads, tokens, tokens]).

    Up to `BIT_PATTERN_UP_TO_BITS` the level is found on float32 bit patterns (two integer passes instead of log2,
    round, nan_to_num and exp2) and the zero code told apart by a threshold between the last level and half of
    it."""
    if x.dtype != torch.float32:
        raise TypeError(f"log_fake_quantize_ works on float32 tensors, got {x.dtype}.")
    if bits > BIT_PATTERN_UP_TO_BITS:
        return _float_log_fake_quantize_(x, scale, bits, sqrt2)
    t = _nearest_power_of_two_(_to_level_domain_(x.div_(scale), sqrt2))
    torch.nn.functional.threshold_(t, 0.75 * 2.0 ** -((1 << bits) - 1), 0.0)
    if sqrt2:
        t.sqrt_()
    return t.mul_(scale)
