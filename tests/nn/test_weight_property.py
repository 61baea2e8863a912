"""`PackedWeightLayer.weight` of a frozen layer: the dequantized weight, served from a float kernel layout where
there is one (model code reads `projection.weight.dtype` at every forward), never a stale or corrupting alias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_lrpq.kernels.reference import dequantize_weight
from optimum_lrpq.nn import QuantSpec, quantize_module


def frozen_conv(backend: str | None) -> nn.Module:
    torch.manual_seed(0)
    conv = quantize_module(nn.Conv2d(3, 8, 4, stride=4), QuantSpec(weight_bits=4, input_bits=None), skeleton=False)
    conv.freeze()
    conv.kernel_backend = backend
    return conv


@pytest.mark.parametrize("backend", [None, "auto"])
def test_weight_is_the_dequantized_weight_before_and_after_a_forward(backend):
    conv = frozen_conv(backend)
    expected = dequantize_weight(conv.packed_weight(), torch.float32)
    assert torch.equal(conv.weight, expected)  # nothing prepared yet: computed
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    first, second = conv.weight, conv.weight
    assert torch.equal(first, expected) and first.dtype == torch.float32
    assert first.data_ptr() == second.data_ptr()  # the kernel layout, not a fresh dequantization each time
    assert not first.requires_grad
    torch.testing.assert_close(conv(x), y, rtol=0, atol=0)


def test_editing_the_returned_weight_in_place_does_not_change_the_layer():
    conv = frozen_conv(None)
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    conv.weight.mul_(0)  # the layer's state is its codes: the layout is rebuilt from them
    assert torch.equal(conv(x), y)
    assert torch.equal(conv.weight, dequantize_weight(conv.packed_weight(), torch.float32))


def test_new_codes_give_a_new_weight():
    conv = frozen_conv(None)
    conv(torch.randn(1, 3, 8, 8))
    before = conv.weight.clone()
    conv.qweight.copy_(torch.flip(conv.qweight, dims=[0]))
    after = conv.weight
    assert not torch.equal(after, before)
    assert torch.equal(after, dequantize_weight(conv.packed_weight(), torch.float32))


def test_linear_with_folded_input_steps_divides_them_back_out():
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    layer = quantize_module(linear, QuantSpec(weight_bits=8, input_bits=8, input_per_channel=True,
                                              input_step_levels=2), skeleton=False)
    layer.input_quant.scale = torch.linspace(0.01, 0.08, 16)
    layer.input_quant.zero_point = torch.zeros(16)
    layer.input_quant.observer = None
    layer.freeze()
    layer(torch.randn(3, 16))
    torch.testing.assert_close(layer.weight, linear.weight.detach(), atol=2e-2, rtol=0)
