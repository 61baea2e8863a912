"""Registration with transformers: the `lrpq` quant method (config + HfQuantizer) and the `lrpq` attention function.

transformers' `register_quantizer` / `register_quantization_config` raise if a name is registered twice, which
happens when the package is re-imported or reloaded; registration therefore checks the registries first.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..configuration import QUANT_METHOD, LRPQConfig
from ..nn import ATTENTION_KEY, lrpq_attention_forward
from .hf_quantizer import LRPQHfQuantizer


def register() -> None:
    """Idempotent: safe to call any number of times, including after `importlib.reload`."""
    # Always point at the current classes: after a reload they are new objects.
    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LRPQConfig
    else:
        register_quantization_config(QUANT_METHOD)(LRPQConfig)
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LRPQHfQuantizer
    else:
        register_quantizer(QUANT_METHOD)(LRPQHfQuantizer)
    AttentionInterface.register(ATTENTION_KEY, lrpq_attention_forward)
