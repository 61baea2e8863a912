"""`QuantLayerNorm` quantizes its output in place at inference: the same values as its quantizer's forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_lrpq.nn import QuantLayerNorm, QuantSpec


@pytest.mark.parametrize("per_channel", [False, True])
def test_in_place_output_quantization_gives_the_quantizer_values(per_channel):
    torch.manual_seed(0)
    float_norm = nn.LayerNorm(16)
    nn.init.normal_(float_norm.weight)
    nn.init.normal_(float_norm.bias)
    layer = QuantLayerNorm.from_float(float_norm, QuantSpec(output_bits=4, output_per_channel=per_channel))
    channels = 16 if per_channel else 1
    layer.out_quant.set_grid(torch.rand(channels) * 0.3 + 0.05, torch.randint(0, 16, (channels,)).float())
    x = torch.randn(3, 5, 16)
    expected = layer.out_quant(float_norm(x))
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    layer.weight.requires_grad_(True)  # autograd: the quantizer's own forward, gradients reach the affine
    y = layer(x)
    assert torch.equal(y.detach(), expected.detach())
    y.sum().backward()
    assert layer.weight.grad is not None
