"""`LRPQuantizer`: the public entry point in Optimum's quantizer shape (`quantize_model`, `save`, `push_to_hub`).

The run itself is `optimum_lrpq.pipeline.quantize`; this class adds what transformers needs to treat the result as a
quantized model (the config, the HfQuantizer, the save methods) and the saving conveniences.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..configuration import LRPQConfig, require_lrpq_config
from ..pipeline import quantize
from .hf_quantizer import LRPQHfQuantizer
from .marking import mark_quantized
from .serialization import save_quantized


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
        # `uniform_fallback`: mean KL of the logits of the allocation and of uniform bits on the calibration images.
        self.uniform_check: dict[str, float] | None = None

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
                images plus `image_processor`), a list of PIL images (with `image_processor`), or an iterable of
                batches. The first `num_calibration_samples` images are used.
            image_processor: turns raw images into pixel values when the data holds images (default: the model's
                own, found by `AutoImageProcessor` from its name or path).
            image_column: the dataset's image column, if it cannot be found automatically.
            show_progress: show tqdm progress bars.
        """
        self.timings, self.uniform_check = {}, None
        result = quantize(model, calibration_data, self.config, image_processor=image_processor,
                          image_column=image_column, show_progress=show_progress)
        self.relevance, self.sensitivity, self.timings = result.relevance, result.sensitivity, result.timings
        self.uniform_check = result.uniform_check
        self.layer_bits = result.layer_bits
        mark_quantized(model, result.config, LRPQHfQuantizer(result.config, pre_quantized=True))
        return model

    def save(self, model: nn.Module, save_dir: str | os.PathLike, overwrite: bool = False,
             base_model: str | None = None, **kwargs: Any) -> None:
        """Save the quantized model (safetensors, config, README.md model card) atomically.

        Unlike `model.save_pretrained`, which merges into an existing directory, this refuses an existing
        `save_dir` unless `overwrite=True`, and then replaces it entirely. Everything is written to a temporary
        sibling directory that is renamed to `save_dir` only once complete, so an interrupted save never leaves a
        partial model behind. `base_model` (the float model's Hub id) is for the card; `kwargs` go to
        `save_pretrained`.
        """
        require_lrpq_config(model)
        save_quantized(model, save_dir, replace=True, overwrite=overwrite, base_model=base_model, **kwargs)

    def push_to_hub(self, model: nn.Module, repo_id: str, *, base_model: str | None = None, token: str | None = None,
                    private: bool | None = None) -> str:
        """Upload the quantized model with its model card (README.md) in one commit; returns the commit URL.

        The same as `model.push_to_hub(repo_id)`, plus `base_model` for the card.
        """
        from .serialization import push_to_hub

        require_lrpq_config(model)
        return push_to_hub(model, repo_id, token=token, private=private, base_model=base_model).commit_url
