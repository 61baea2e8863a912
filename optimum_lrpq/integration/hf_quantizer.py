"""`LRPQHfQuantizer`: the transformers side — builds the quantized skeleton before weights are loaded.

Loading a pre-quantized checkpoint: `from_pretrained` builds the model on the meta device, calls
`_process_model_before_weight_loading` (we swap in quantized modules sized from `layer_bits`), then fills every
tensor from the safetensors file. Quantizing at load time (a float checkpoint plus an `LRPQConfig` with a
`calibration_dataset`) runs the whole pipeline after the float weights are loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.utils import logging

from ..configuration import LRPQConfig
from ..data.loading import load_calibration_dataset
from ..models import get_adapter
from ..nn import ATTENTION_KEY, PackedWeightLayer, prepare_kernels, set_kernel_backend
from ..pipeline import quantize
from ..pipeline.conversion import convert_model, known_module_names
from .checkpoint import validate_checkpoint, validate_grids, validate_layer_names
from .marking import finish_quantized, mark_quantized

logger = logging.get_logger(__name__)

# Overrides the checkpoint's `kernel_backend` when loading (e.g. "reference" to compare against the float oracle).
KERNEL_BACKEND_VARIABLE = "OPTIMUM_LRPQ_KERNEL_BACKEND"


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
        validate_layer_names(model, known_module_names(layout), self.quantization_config.layer_bits)
        convert_model(model, layout, self.quantization_config.layer_bits, self.quantization_config, skeleton=True)
        # transformers would only warn about missing/unexpected tensors; for quantized weights that is a wrong model.
        validate_checkpoint(model, kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            self._quantize_loaded(model)
        else:
            validate_grids(model)
        if model.config._attn_implementation != ATTENTION_KEY:
            model.set_attn_implementation(ATTENTION_KEY)
        backend = os.environ.get(KERNEL_BACKEND_VARIABLE) or self.quantization_config.kernel_backend
        set_kernel_backend(model, backend)
        if not _offloaded(model):  # accelerate moves offloaded weights in and out at each forward: leave them be
            _own_storage(model)  # first: the kernels' caches are keyed on the tensors they were built from
            prepare_kernels(model)  # int8 layouts now: less resident memory, no preparation in the first forward
        finish_quantized(model)  # tags; save_pretrained / push_to_hub write the lrpq model card, atomically
        return model

    def _quantize_loaded(self, model) -> None:
        """On-the-fly quantization of a freshly loaded float model on the dataset named in the config."""
        config = self.quantization_config
        dataset = load_calibration_dataset(config.calibration_dataset, config.calibration_split,
                                           config.num_calibration_samples)
        with torch.no_grad():
            result = quantize(model, dataset, config, image_column=config.calibration_image_column)
        self.quantization_config = result.config
        mark_quantized(model, result.config, type(self)(result.config, pre_quantized=True))

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _offloaded(model) -> bool:
    """Whether some weights of `model` live outside it (accelerate offloading to CPU or disk: meta tensors)."""
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _own_storage(model) -> None:
    """Copy the model's CPU tensors out of the checkpoint file.

    transformers loads safetensors tensors as views of the memory-mapped file; the mapping stays (and its pages
    count as resident memory of the process) while any tensor views it, even once the kernel layouts have replaced
    the stored codes (`prepare_kernels`), which then frees the copies."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.device.type == "cpu":
                    param.data = param.data.clone()
            # codes already given up to a kernel layout (quantized while loading): their placeholder stays
            released = isinstance(module, PackedWeightLayer) and module.codes_released
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device.type == "cpu" and not (released and name == "qweight"):
                    module._buffers[name] = buffer.clone()
