"""Quantized modules: packed-weight linear/conv layers, activation quantizers, LayerNorm with output quantizer,
and the `lrpq` attention function."""

from .activation import LogQuantizer, PerHeadQuantizer, UniformQuantizer
from .attention import ATTENTION_KEY, add_attention_quantizers, lrpq_attention_forward
from .layernorm import QuantLayerNorm
from .linear import QuantConv2d, QuantLinear
from .weights import PackedWeightLayer

__all__ = [
    "ATTENTION_KEY",
    "LogQuantizer",
    "PackedWeightLayer",
    "PerHeadQuantizer",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantLinear",
    "UniformQuantizer",
    "add_attention_quantizers",
    "lrpq_attention_forward",
]
