"""The LayerNorm reparameterization keeps the float function and reproduces the per-channel grid."""

from __future__ import annotations

import pytest
import torch

from optimum_lrpq.quantization import uniform
from optimum_lrpq.quantization.ranges import minmax_range
from optimum_lrpq.quantization.reparameterization import fold_error, reparameterize, search_fold_strength


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


# ------------------------------------------------------------------------------------- partial fold (fold_strength)



@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_partial_fold_keeps_float_function(alpha):
    x_norm, gamma, beta, weights, biases = _setup(seed=2)
    x = x_norm * gamma + beta
    scale, zp = minmax_range(x, 4, channel_axis=1)
    out = reparameterize(scale, zp, gamma, beta, weights, biases, alpha=alpha, bits=4)
    x_new = x_norm * out.layernorm_weight + out.layernorm_bias
    torch.testing.assert_close(x_new, x / out.ratio - out.shift, rtol=1e-9, atol=1e-9)
    for w, b, w_new, b_new in zip(weights, biases, out.linear_weights, out.linear_biases):
        before = x @ w.T + (b if b is not None else 0)
        torch.testing.assert_close(x_new @ w_new.T + b_new, before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_partial_fold_grid_covers_every_channel(alpha):
    x_norm, gamma, beta, weights, biases = _setup(seed=3)
    x = x_norm * gamma + beta
    bits = 6
    scale, zp = minmax_range(x, bits, channel_axis=1)
    out = reparameterize(scale, zp, gamma, beta, weights, biases, alpha=alpha, bits=bits)
    x_new = x_norm * out.layernorm_weight + out.layernorm_bias
    codes = x_new / out.scale.double() + out.zero_point.double()
    assert codes.min() >= -0.5 - 1e-6 and codes.max() <= uniform.qmax(bits) + 0.5 + 1e-6  # nothing is clipped
    # the weights grow by r^alpha only
    torch.testing.assert_close(out.ratio, (scale.reshape(-1).double() / scale.double().mean()) ** alpha)


def test_alpha_one_is_repq_and_alpha_zero_leaves_weights():
    x_norm, gamma, beta, weights, biases = _setup(seed=4)
    x = x_norm * gamma + beta
    scale, zp = minmax_range(x, 4, channel_axis=1)
    full = reparameterize(scale, zp, gamma, beta, weights, biases)
    one = reparameterize(scale, zp, gamma, beta, weights, biases, alpha=1.0, bits=4)
    assert torch.equal(full.scale, one.scale) and torch.equal(full.zero_point, one.zero_point)
    for a, b in zip(full.linear_weights, one.linear_weights):
        assert torch.equal(a, b)
    none = reparameterize(scale, zp, gamma, beta, weights, biases, alpha=0.0, bits=4)
    for a, b in zip(none.linear_weights, weights):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bit width"):
        reparameterize(scale, zp, gamma, beta, weights, biases, alpha=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reparameterize(scale, zp, gamma, beta, weights, biases, alpha=1.5, bits=4)


def test_fold_search_prefers_low_error():
    x_norm, gamma, beta, weights, biases = _setup(seed=5)
    x = (x_norm * gamma + beta).float()
    scale, zp = minmax_range(x, 8, channel_axis=1)
    weights = [w.float() for w in weights]
    biases = [b.float() if b is not None else None for b in biases]
    alphas = [0.0, 0.5, 1.0]
    best, errors = search_fold_strength(x, scale, zp, weights, biases, alphas, 8, [8, 8, 8])
    assert errors[alphas.index(best)] == min(errors)
    # with float weights the full fold reproduces the per-channel grid, the best the activations can get
    scale4, zp4 = minmax_range(x, 4, channel_axis=1)
    _, float_errors = search_fold_strength(x, scale4, zp4, weights, biases, alphas, 4, [None, None, None])
    assert float_errors[2] <= min(float_errors) + 1e-12
    assert fold_error(x, scale, zp, weights, biases, 1.0, 8, [None, None, None]) < 1e-3
