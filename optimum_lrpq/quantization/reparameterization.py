"""Scale reparameterization of a per-channel post-LayerNorm quantizer (RepQ-ViT; method-reference.md §2.3).

Given per-channel grids (s_c, z_c) of a LayerNorm's output x, with target per-tensor grid s̃ = mean(s_c),
z̃ = mean(z_c) (z̃ left unrounded), r_c = s_c / s̃ and b_c = s̃ (z̃ − z_c):

    LayerNorm:    γ'_c = γ_c / r_c,   β'_c = β_c / r_c − b_c        (so x'_c = x_c / r_c − b_c)
    next linear:  W'[:, c] = r_c W[:, c],   bias' = bias + W' b

The float function is unchanged (W'x' + bias' = Wx + bias) and x'_c / s̃ + z̃ = x_c / s_c + z_c, so one
per-tensor grid (s̃, z̃) on x' yields exactly the per-channel codes of x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reparameterized:
    layernorm_weight: torch.Tensor
    layernorm_bias: torch.Tensor
    linear_weights: list[torch.Tensor]
    linear_biases: list[torch.Tensor]
    scale: torch.Tensor  # s̃, shape [1]
    zero_point: torch.Tensor  # z̃, shape [1]


def reparameterize(
    channel_scale: torch.Tensor,
    channel_zero_point: torch.Tensor,
    layernorm_weight: torch.Tensor,
    layernorm_bias: torch.Tensor,
    linear_weights: list[torch.Tensor],
    linear_biases: list[torch.Tensor | None],
) -> Reparameterized:
    """Fold per-channel grids into the LayerNorm affine and the consuming linears (all math in float64)."""
    s = channel_scale.double().reshape(-1)
    z = channel_zero_point.double().reshape(-1)
    s_t, z_t = s.mean(), z.mean()
    r = s / s_t
    b = s_t * (z_t - z)
    gamma = (layernorm_weight.double() / r).to(layernorm_weight.dtype)
    beta = (layernorm_bias.double() / r - b).to(layernorm_bias.dtype)
    weights, biases = [], []
    for w, bias in zip(linear_weights, linear_biases):
        w_new = w.double() * r[None, :]
        bias_old = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        weights.append(w_new.to(w.dtype))
        biases.append((bias_old + w_new @ b).to(w.dtype if bias is None else bias.dtype))
    return Reparameterized(gamma, beta, weights, biases, s_t.float().reshape(1), z_t.float().reshape(1))
