"""The LayerNorm reparameterization keeps the float function and reproduces the per-channel grid."""

from __future__ import annotations

import torch

from optimum_lrpq.quantization import uniform
from optimum_lrpq.quantization.ranges import minmax_range
from optimum_lrpq.quantization.reparameterization import reparameterize


def _setup(seed=0, channels=16, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x_norm = torch.randn(64, channels, generator=g, dtype=torch.float64)
    gamma = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(channels, generator=g, dtype=torch.float64)
    if outliers:
        gamma[3] *= 30.0  # an outlier channel, as in real ViTs
    weights = [torch.randn(8, channels, generator=g, dtype=torch.float64) for _ in range(3)]
    biases = [torch.randn(8, generator=g, dtype=torch.float64), None, torch.randn(8, generator=g, dtype=torch.float64)]
    return x_norm, gamma, beta, weights, biases


def test_float_function_unchanged():
    x_norm, gamma, beta, weights, biases = _setup()
    x = x_norm * gamma + beta
    scale, zp = minmax_range(x, 4, channel_axis=1)
    out = reparameterize(scale, zp, gamma, beta, weights, biases)
    x_new = x_norm * out.layernorm_weight + out.layernorm_bias
    for w, b, w_new, b_new in zip(weights, biases, out.linear_weights, out.linear_biases):
        before = x @ w.T + (b if b is not None else 0)
        after = x_new @ w_new.T + b_new
        torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_per_tensor_grid_reproduces_per_channel_grid():
    x_norm, gamma, beta, weights, biases = _setup(seed=1)
    x = x_norm * gamma + beta
    bits = 4
    scale, zp = minmax_range(x, bits, channel_axis=1)
    per_channel_codes = uniform.quantize(x, scale, zp, bits)
    out = reparameterize(scale, zp, gamma, beta, weights, biases)
    x_new = x_norm * out.layernorm_weight + out.layernorm_bias
    per_tensor_codes = uniform.quantize(x_new, out.scale.double(), out.zero_point.double(), bits)
    assert torch.equal(per_tensor_codes, per_channel_codes)
    # and the dequantized values map back through the linear identically
    w, w_new, b_new = weights[0], out.linear_weights[0], out.linear_biases[0]
    y_channel = uniform.dequantize(per_channel_codes, scale, zp) @ w.T + biases[0]
    y_tensor = uniform.dequantize(per_tensor_codes, out.scale.double(), out.zero_point.double()) @ w_new.T + b_new
    torch.testing.assert_close(y_tensor, y_channel, rtol=1e-6, atol=1e-6)


def test_target_grid_is_the_mean():
    scale = torch.tensor([1.0, 2.0, 3.0])
    zp = torch.tensor([1.0, 2.0, 4.0])
    out = reparameterize(scale, zp, torch.ones(3), torch.zeros(3), [torch.eye(3)], [None])
    assert torch.allclose(out.scale, torch.tensor([2.0]))
    assert torch.allclose(out.zero_point, torch.tensor([7.0 / 3.0]))
    torch.testing.assert_close(out.linear_weights[0], torch.diag(torch.tensor([0.5, 1.0, 1.5])))
