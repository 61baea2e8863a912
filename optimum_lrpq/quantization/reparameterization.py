"""Scale reparameterization of a per-channel post-LayerNorm quantizer (RepQ-ViT; method-reference.md §2.3).

Given per-channel grids (s_c, z_c) of a LayerNorm's output x, with target per-tensor grid s̃ = mean(s_c),
z̃ = mean(z_c) (z̃ left unrounded), r_c = s_c / s̃ and b_c = s̃ (z̃ − z_c):

    LayerNorm:    γ'_c = γ_c / r_c,   β'_c = β_c / r_c − b_c        (so x'_c = x_c / r_c − b_c)
    next linear:  W'[:, c] = r_c W[:, c],   bias' = bias + W' b

The float function is unchanged (W'x' + bias' = Wx + bias) and x'_c / s̃ + z̃ = x_c / s_c + z_c, so one
per-tensor grid (s̃, z̃) on x' yields exactly the per-channel codes of x.

Partial fold (`alpha` < 1). Folding all of r_c into the next linear multiplies its weight column c by r_c: a few
outlier channels (r_c of 10–100 in pretrained ViTs such as DINOv2) then dominate every row's per-row weight range
and, at 4 bits, wipe out the other weights. With strength α in [0, 1] we fold only r_c^α:

    r_c = (s_c / s̃)^α,   b_c = center_c / r_c − t

where center_c = s_c (qmax/2 − z_c) is the middle of channel c's grid range and t = s̃ (qmax/2 − z̃). Every
channel's range, divided by r_c, is centred on t, and the per-tensor grid is the narrowest one covering all of
them: step max_c(s_c / r_c), zero point (qmax/2 · step − t) / step. α = 1 is RepQ-ViT exactly (per-channel codes
reproduced); α = 0 only shifts the channel centres (free, through the bias) and leaves the weights alone. The
float function is unchanged for every α. The choice of s̃ does not matter for the quantization error: a common
factor in r_c scales x' and W' inversely, and both per-tensor and per-row grids are scale-equivariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ranges import estimate_range
from .uniform import qmax as _qmax


@dataclass
class Reparameterized:
    layernorm_weight: torch.Tensor
    layernorm_bias: torch.Tensor
    linear_weights: list[torch.Tensor]
    linear_biases: list[torch.Tensor]
    scale: torch.Tensor  # per-tensor step of x', shape [1]
    zero_point: torch.Tensor  # per-tensor zero point of x' (not rounded), shape [1]
    ratio: torch.Tensor  # r_c, float64: x'_c = x_c / r_c - shift_c
    shift: torch.Tensor  # b_c, float64


def fold_factors(
    channel_scale: torch.Tensor, channel_zero_point: torch.Tensor, alpha: float = 1.0, bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, b, step, zero_point) of the fold with strength `alpha`, in float64 (`bits` is needed when alpha != 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"The fold strength alpha must be in [0, 1], got {alpha}.")
    s = channel_scale.double().reshape(-1)
    z = channel_zero_point.double().reshape(-1)
    s_t, z_t = s.mean(), z.mean()
    if alpha == 1.0:  # RepQ-ViT, written so that the per-channel codes are reproduced bit for bit
        r = s / s_t
        return r, s_t * (z_t - z), s_t.reshape(1), z_t.reshape(1)
    if bits is None:
        raise ValueError("A partial fold (alpha < 1) needs the bit width of the activation grid.")
    half = _qmax(bits) / 2.0
    r = (s / s_t) ** alpha
    target = s_t * (half - z_t)
    b = s * (half - z) / r - target
    step = (s / r).max()
    return r, b, step.reshape(1), ((half * step - target) / step).reshape(1)


def reparameterize(
    channel_scale: torch.Tensor,
    channel_zero_point: torch.Tensor,
    layernorm_weight: torch.Tensor,
    layernorm_bias: torch.Tensor,
    linear_weights: list[torch.Tensor],
    linear_biases: list[torch.Tensor | None],
    alpha: float = 1.0,
    bits: int | None = None,
) -> Reparameterized:
    """Fold per-channel grids (strength `alpha`) into the LayerNorm affine and the consuming linears (float64 math)."""
    r, b, step, zero_point = fold_factors(channel_scale, channel_zero_point, alpha, bits)
    gamma = (layernorm_weight.double() / r).to(layernorm_weight.dtype)
    beta = (layernorm_bias.double() / r - b).to(layernorm_bias.dtype)
    weights, biases = [], []
    for w, bias in zip(linear_weights, linear_biases):
        w_new = w.double() * r[None, :]
        bias_old = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        weights.append(w_new.to(w.dtype))
        biases.append((bias_old + w_new @ b).to(w.dtype if bias is None else bias.dtype))
    return Reparameterized(gamma, beta, weights, biases, step.float(), zero_point.float(), r, b)


def fold_error(
    samples: torch.Tensor,
    channel_scale: torch.Tensor,
    channel_zero_point: torch.Tensor,
    linear_weights: list[torch.Tensor],
    linear_biases: list[torch.Tensor | None],
    alpha: float,
    activation_bits: int,
    weight_bits: list[int | None],
    weight_range: str = "minmax",
) -> float:
    """Output error of the consumers after a fold of strength `alpha`, on [tokens, channels] LayerNorm outputs.

    Each consumer computes fake-quantized x' (the per-tensor grid of the fold) times its fake-quantized folded weight
    (per row, `weight_range` method; a consumer with `None` bits keeps a float weight); the error is the sum over
    consumers of the mean squared output error relative to the mean square of the float output, so that q, k and v
    count alike.
    """
    from .uniform import fake_quantize

    r, b, step, zero_point = fold_factors(channel_scale, channel_zero_point, alpha, activation_bits)
    x = samples.double()
    x_new = (x / r - b).float()
    x_q = fake_quantize(x_new, step.float(), zero_point.float(), activation_bits).double()
    total = 0.0
    for w, bias, bits in zip(linear_weights, linear_biases, weight_bits):
        w = w.double()
        w_new = (w * r[None, :]).float()
        if bits is None:
            w_q = w_new.double()
        else:
            scale, zp = estimate_range(w_new, bits, channel_axis=0, method=weight_range)
            w_q = fake_quantize(w_new, scale, zp, bits).double()
        reference = x @ w.T
        # bias' - bias = W' b: the bias itself cancels in the error
        error = x_q @ w_q.T + (w * r[None, :]) @ b - reference
        total += float(error.square().mean() / reference.square().mean().clamp_min(1e-30))
    return total


def search_fold_strength(
    samples: torch.Tensor,
    channel_scale: torch.Tensor,
    channel_zero_point: torch.Tensor,
    linear_weights: list[torch.Tensor],
    linear_biases: list[torch.Tensor | None],
    alphas: list[float],
    activation_bits: int,
    weight_bits: list[int | None],
    weight_range: str = "minmax",
) -> tuple[float, list[float]]:
    """The fold strength of `alphas` with the least `fold_error` (ties: the first), and every candidate's error."""
    errors = [fold_error(samples, channel_scale, channel_zero_point, linear_weights, linear_biases, a, activation_bits,
                         weight_bits, weight_range) for a in alphas]
    best = min(range(len(alphas)), key=lambda i: errors[i])
    return alphas[best], errors
