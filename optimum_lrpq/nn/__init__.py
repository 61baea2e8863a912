"""Quantized modules: packed-weight linear/conv layers, activation quantizers, LayerNorm with output quantizer,
and the `lrpq` attention function."""

from .activation import ActivationQuantizer, LogQuantizer, PerHeadQuantizer, UniformQuantizer
from .attention import ATTENTION_KEY, add_attention_quantizers, lrpq_attention_forward
from .layernorm import QuantLayerNorm
from .linear import QuantConv2d, QuantLinear
from .registry import (
    QuantSpec,
    is_quantized_module,
    quantize_module,
    quantized_class_for,
    register_qmodule,
    set_kernel_backend,
)
from .weights import PackedWeightLayer, prepare_kernels

__all__ = [
    "ATTENTION_KEY",
    "ActivationQuantizer",
    "LogQuantizer",
    "PackedWeightLayer",
    "PerHeadQuantizer",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantLinear",
    "QuantSpec",
    "UniformQuantizer",
    "add_attention_quantizers",
    "is_quantized_module",
    "lrpq_attention_forward",
    "prepare_kernels",
    "quantize_module",
    "quantized_class_for",
    "register_qmodule",
    "set_kernel_backend",
]
