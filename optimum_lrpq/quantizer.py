"""`LRPQuantizer`: the post-training quantization pipeline (SPEC §3), free of model-specific code.

    prepare (adapter, calibration data) -> [relevance + allocation] -> convert modules -> calibrate
    (observe, reparameterize, quantize weights) -> record the config so save/load round-trips exactly.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .calibration import calibrate
from .configuration import LRPQConfig
from .conversion import convert_model, plan_layer_bits, restore_model
from .data import CalibrationSet, prepare_calibration_data
from .hf_quantizer import MODEL_TAGS, LRPQHfQuantizer
from .mixed_precision import RELEVANCE_ALLOCATIONS, SENSITIVITY_ALLOCATIONS, choose_layer_bits, unit_sensitivity
from .models import get_adapter
from .nn import ATTENTION_KEY, PackedWeightLayer
from .output_dir import staged_output
from .placement import onload
from .relevance import compute_relevance
from .serialization import attach_save_methods, save_quantized

logger = logging.get_logger(__name__)


class LRPQuantizer:
    """Quantizes a supported `*ForImageClassification` model with LRP-QViT.

    Follows the shape of Optimum's quantizers (`GPTQQuantizer`): configure once, then `quantize_model(model, data)`
    and `save(model, dir)`.

    Example:
        >>> quantizer = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4))
        >>> qmodel = quantizer.quantize_model(model, pixel_values)
        >>> qmodel.save_pretrained("vit-lrpq")
    """

    def __init__(self, config: LRPQConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("Pass either an LRPQConfig or keyword arguments for one, not both.")
        self.config = config if config is not None else LRPQConfig(**kwargs)
        if not isinstance(self.config, LRPQConfig):
            raise TypeError(f"config must be an LRPQConfig, got {type(self.config).__name__}.")
        self.relevance: dict[str, float] | None = None
        # Mix-QViT sensitivity (unit -> {bits: loss increase}) of the last call, for the sensitivity allocations.
        self.sensitivity: dict[str, dict[int, float]] | None = None
        self.layer_bits: dict[str, dict[str, int]] | None = None
        # Seconds per pipeline stage of the last `quantize_model` call (relevance, allocation, calibration, ...).
        self.timings: dict[str, float] = {}

    def quantize_model(
        self,
        model: nn.Module,
        calibration_data: Any,
        *,
        image_processor: Any = None,
        image_column: str | None = None,
        show_progress: bool = True,
    ) -> nn.Module:
        """Quantize `model` in place and return it.

        Args:
            model: a supported float model (see `optimum_lrpq.supported_models()`).
            calibration_data: pixel values (tensor [N, C, H, W]), a `datasets` dataset (with `pixel_values`, or
                images plus `image_processor`), or an iterable of batches. The first `num_calibration_samples`
                images are used.
            image_processor: turns raw images into pixel values when the dataset holds images.
            image_column: the dataset's image column, if it cannot be found automatically.
            show_progress: show tqdm progress bars.
        """
        config = copy.deepcopy(self.config)
        config.layer_bits, config.relevance = None, None
        # Everything that can be wrong with the input is checked before the model is modified.
        already = any(isinstance(m, PackedWeightLayer) for m in model.modules())
        if already or getattr(model, "quantization_method", "lrpq") != "lrpq":
            raise ValueError("This model is already quantized; quantize the original float model instead.")
        adapter = get_adapter(model)
        layout = adapter.layout(model)
        calibration = prepare_calibration_data(
            calibration_data, model, num_samples=config.num_calibration_samples,
            batch_size=config.calibration_batch_size, image_processor=image_processor, image_column=image_column,
            fixed_image_size=adapter.fixed_image_size,
        )
        onload(model)  # accelerate-offloaded weights (device_map with cpu/disk) must be in memory to be rewritten
        was_training = model.training
        model.eval()
        self.timings = {}
        layer_bits = self._choose_bits(model, layout, config, calibration, show_progress)
        previous_attention = model.config._attn_implementation
        replaced = convert_model(model, layout, layer_bits, config, skeleton=False)
        try:
            model.set_attn_implementation(ATTENTION_KEY)
            calibrate(model, layout, config, calibration.batches, show_progress=show_progress, timings=self.timings)
        except BaseException:
            restore_model(model, replaced)
            model.set_attn_implementation(previous_attention)
            model.train(was_training)
            raise
        config.layer_bits = layer_bits
        config.relevance = self.relevance
        config.base_model = config.base_model or getattr(model.config, "_name_or_path", None) or None
        self.layer_bits = layer_bits
        _mark_quantized(model, config)
        logger.info(f"Quantized {sum(1 for e in layer_bits.values() if 'weight' in e)} weight layers of "
                    f"{type(model).__name__} on {calibration.num_images} calibration images.")
        return model

    def _choose_bits(self, model, layout, config: LRPQConfig, calibration: CalibrationSet, show_progress: bool):
        bits = plan_layer_bits(layout, config)
        self.relevance = None
        self.sensitivity = None
        if not config.mixed_precision:
            return bits
        if config.allocation in RELEVANCE_ALLOCATIONS:
            if config.relevance_target == "label" and calibration.labels is None:
                raise ValueError(
                    "relevance_target='label' needs labels in the calibration data (a 'label'/'labels' column or "
                    "(images, labels) batches); use relevance_target='predicted' otherwise."
                )
            start = time.perf_counter()
            images = calibration.first(config.num_relevance_samples)
            self.relevance = compute_relevance(
                model, images.batches, target=config.relevance_target,
                labels=images.labels if config.relevance_target == "label" else None,
                score=config.relevance_score, rule=config.relevance_rule, show_progress=show_progress,
            )
            self.timings["relevance"] = time.perf_counter() - start
        if config.allocation in SENSITIVITY_ALLOCATIONS:
            start = time.perf_counter()
            self.sensitivity = unit_sensitivity(model, layout, config, bits, calibration, show_progress)
            self.timings["sensitivity"] = time.perf_counter() - start
        start = time.perf_counter()
        bits = choose_layer_bits(model, layout, config, bits, calibration, self.relevance, self.sensitivity)
        self.timings["allocation"] = time.perf_counter() - start
        return bits

    def save(self, model: nn.Module, save_dir: str | os.PathLike, overwrite: bool = False,
             base_model: str | None = None, **kwargs: Any) -> None:
        """Save the quantized model (safetensors, config, README.md model card) atomically.

        Unlike `model.save_pretrained`, which merges into an existing directory, this refuses an existing
        `save_dir` unless `overwrite=True`, and then replaces it entirely. Everything is written to a temporary
        sibling directory that is renamed to `save_dir` only once complete, so an interrupted save never leaves a
        partial model behind. `base_model` (the float model's Hub id) is for the card; `kwargs` go to
        `save_pretrained`.
        """
        _check_quantized(model)
        with staged_output(save_dir, overwrite) as staging:
            save_quantized(model, staging, base_model=base_model, **kwargs)

    def push_to_hub(self, model: nn.Module, repo_id: str, *, base_model: str | None = None, token: str | None = None,
                    private: bool | None = None) -> str:
        """Upload the quantized model with its model card (README.md) in one commit; returns the commit URL.

        The same as `model.push_to_hub(repo_id)`, plus `base_model` for the card.
        """
        from .serialization import push_to_hub

        _check_quantized(model)
        return push_to_hub(model, repo_id, token=token, private=private, base_model=base_model).commit_url


def _check_quantized(model: nn.Module) -> None:
    if not getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None) != "lrpq":
        raise ValueError("This model is not quantized with lrpq; call quantize_model first.")


def _mark_quantized(model: nn.Module, config: LRPQConfig) -> None:
    """Set what `from_pretrained` would have set, so `save_pretrained` / `push_to_hub` treat it as quantized."""
    model.config.quantization_config = config
    model.hf_quantizer = LRPQHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.add_model_tags(list(MODEL_TAGS))
    attach_save_methods(model)  # save_pretrained / push_to_hub write the lrpq model card, atomically
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_is_quantized"):
            module.config._is_quantized = True
    model.config._is_quantized = True


def quantize_at_load_time(model: nn.Module, config: LRPQConfig) -> None:
    """Quantize a freshly loaded float model using the dataset named in `config` (on-the-fly loading)."""
    from .datasets_io import load_calibration_dataset

    dataset = load_calibration_dataset(config.calibration_dataset, config.calibration_split,
                                       config.num_calibration_samples)
    quantizer = LRPQuantizer(config)
    with torch.no_grad():
        quantizer.quantize_model(model, dataset, image_column=config.calibration_image_column)
