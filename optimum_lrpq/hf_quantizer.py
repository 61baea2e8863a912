"""`LRPQHfQuantizer`: the transformers side — builds the quantized skeleton before weights are loaded.

Loading a pre-quantized checkpoint: `from_pretrained` builds the model on the meta device, calls
`_process_model_before_weight_loading` (we swap in quantized modules sized from `layer_bits`), then fills every
tensor from the safetensors file. Quantizing at load time (a float checkpoint plus an `LRPQConfig` with a
`calibration_dataset`) runs the whole pipeline after the float weights are loaded.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.utils import logging

from .checkpoint import validate_checkpoint
from .configuration import LRPQConfig
from .conversion import convert_model
from .models import get_adapter
from .nn import ATTENTION_KEY

logger = logging.get_logger(__name__)

# Hub tags of every lrpq model (model card front matter).
MODEL_TAGS = ("lrpq", "quantization", "vision")


class LRPQHfQuantizer(HfQuantizer):
    # False so that `from_pretrained(float_model, quantization_config=LRPQConfig(calibration_dataset=...))` is allowed.
    requires_calibration = False

    def __init__(self, quantization_config: LRPQConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:
            if not config.layer_bits:
                raise ValueError(
                    "This lrpq checkpoint's quantization_config has no `layer_bits`, so its quantized tensors cannot "
                    "be interpreted. The checkpoint is incomplete or corrupt; re-export it with optimum-lrpq."
                )
        elif config.calibration_dataset is None:
            raise ValueError(
                "Quantizing while loading needs calibration images: pass "
                "LRPQConfig(..., calibration_dataset='<hub dataset name or local path>'), or load the float model and "
                "call LRPQuantizer(config).quantize_model(model, calibration_data)."
            )

    def update_attn_implementation(self, config):
        # The quantized softmax and matmuls live in our attention function; SDPA would hide them.
        config._attn_implementation = ATTENTION_KEY
        return config

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            return model  # float weights load as usual; quantization happens after loading
        layout = get_adapter(model).layout(model)
        convert_model(model, layout, self.quantization_config.layer_bits, self.quantization_config, skeleton=True)
        # transformers would only warn about missing/unexpected tensors; for quantized weights that is a wrong model.
        validate_checkpoint(model, kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            from .quantizer import quantize_at_load_time

            quantize_at_load_time(model, self.quantization_config)
        if model.config._attn_implementation != ATTENTION_KEY:
            model.set_attn_implementation(ATTENTION_KEY)
        model.add_model_tags(list(MODEL_TAGS))
        from .serialization import attach_save_methods

        attach_save_methods(model)  # save_pretrained / push_to_hub write the lrpq model card, atomically
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
