"""The float -> quantized module registry used by module conversion."""

from __future__ import annotations

import pytest
from torch import nn

from optimum_lrpq.nn import QuantConv2d, QuantLayerNorm, QuantLinear, QuantSpec, quantize_module, quantized_class_for


def test_each_float_class_has_its_quantized_twin():
    assert quantized_class_for(nn.Linear(4, 3)) is QuantLinear
    assert quantized_class_for(nn.Conv2d(3, 4, 2)) is QuantConv2d
    assert quantized_class_for(nn.LayerNorm(4)) is QuantLayerNorm

    class MyLinear(nn.Linear):  # a subclass is quantized like its base
        pass

    assert quantized_class_for(MyLinear(4, 3)) is QuantLinear


def test_skeleton_and_from_float_share_the_layout():
    linear = nn.Linear(8, 5)
    spec = QuantSpec(weight_bits=4, input_bits=8)
    skeleton = quantize_module(linear, spec, skeleton=True)
    wrapped = quantize_module(linear, spec, skeleton=False)
    assert skeleton.qweight.is_meta and not wrapped.is_frozen
    wrapped.freeze()
    assert {k: v.shape for k, v in wrapped.state_dict().items()} == {
        k: v.shape for k, v in skeleton.state_dict().items()}


def test_an_unregistered_module_names_what_is_quantizable():
    with pytest.raises(TypeError, match=r"No quantized module for GELU; quantizable: \['Conv2d', 'LayerNorm', 'Linear'\]"):
        quantized_class_for(nn.GELU())


def test_step_levels_need_the_layers_own_input_quantizer():
    # The folded steps are those of the layer's input grid; an input quantized upstream has none of its own.
    with pytest.raises(ValueError, match=r"input_step_levels needs the layer's own input quantizer \(input_bits\)"):
        quantize_module(nn.Linear(8, 4), QuantSpec(weight_bits=4, input_bits=None, input_step_levels=4), skeleton=False)
