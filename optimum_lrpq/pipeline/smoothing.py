"""Query/key smoothing (`LRPQConfig.qk_smoothing`, `quantization.smoothing`) applied to a model being quantized.

The channel ranges are measured on the float model, before conversion (one float pass over the calibration
images); the factors are then folded into the converted q and k layers' float weights, which are copies, so the
original modules stay as they were if quantization fails and is rolled back.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import ModelLayout
from ..quantization.smoothing import query_key_factors
from .placement import model_device_and_dtype


@torch.no_grad()
def query_key_ranges(model: nn.Module, layout: ModelLayout, batches: list[torch.Tensor],
                     show_progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(max|q_c|, max|k_c|) per block of `layout`, over every token of `batches`, from the float model."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output):
            absmax = output.detach().abs().reshape(-1, output.shape[-1]).amax(dim=0).float().cpu()
            maxima[name] = absmax if name not in maxima else torch.maximum(maxima[name], absmax)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name))
               for block in layout.blocks for name in (block.q, block.k)]
    try:
        device, dtype = model_device_and_dtype(model)
        for batch in tqdm(batches, desc="Query/key ranges", unit="batch", disable=not show_progress):
            model(pixel_values=batch.to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [(maxima[block.q], maxima[block.k]) for block in layout.blocks]


@torch.no_grad()
def smooth_queries_and_keys(model: nn.Module, layout: ModelLayout,
                            ranges: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """Multiply each block's q rows by s and divide its k rows by s (`query_key_factors`), weights and biases."""
    for block, (query_absmax, key_absmax) in zip(layout.blocks, ranges, strict=True):
        query, key = model.get_submodule(block.q), model.get_submodule(block.k)
        factors = query_key_factors(query_absmax, key_absmax, alpha).to(query.weight.device)
        for layer, scale in ((query, factors), (key, factors.reciprocal())):
            if layer.weight.shape[0] != scale.numel():
                raise ValueError(f"{block.q} / {block.k}: {scale.numel()} channel ranges for "
                                 f"{layer.weight.shape[0]} output channels.")
            layer.weight.mul_(scale.to(layer.weight.dtype)[:, None])
            if layer.bias is not None:
                layer.bias.mul_(scale.to(layer.bias.dtype))
