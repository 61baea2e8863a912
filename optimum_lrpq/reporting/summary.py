"""What a quantized model's config says about its bits: the layer lists in model order and the average bits as the
mixed-precision budgets count them (used by the model card, the CLI and the plot)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..configuration import require_lrpq_config
from ..models import get_adapter
from ..pipeline.mixed_precision import layer_macs


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def ordered_layer_names(names: Iterable[str], order: Sequence[str] | None = None) -> list[str]:
    """`names` in model order: by position in `order` (e.g. `[n for n, _ in model.named_modules()]`), else naturally
    sorted ('layers.2' before 'layers.10'). A saved config lists layers alphabetically, so order matters."""
    if order is not None:
        position = {n: i for i, n in enumerate(order)}
        return sorted(names, key=lambda n: (position.get(n, len(position)), _natural_key(n)))
    return sorted(names, key=_natural_key)


def weight_layer_names(layer_bits: Mapping[str, Mapping[str, int]], order: Sequence[str] | None = None) -> list[str]:
    """Layers that have a weight (the ones relevance is scored for), in model order (see `ordered_layer_names`).

    `layer_bits` also holds activation-only entries (LayerNorm outputs, attention operands); they share the bits of
    the linears that read them and are left out.
    """
    return ordered_layer_names((n for n, entry in layer_bits.items() if "weight" in entry), order)


@torch.no_grad()
def bits_summary(model) -> dict[str, float]:
    """Average bits of a quantized model, as the mixed-precision budgets count them.

    `weight_bits`: parameter-weighted over the quantized weight layers; `activation_bits`: weighted by each layer's
    multiply-accumulates (one forward pass on a blank image). The patch embedding (8-bit image input by design) is
    left out of both, like in the budgets; `quantized_weights` is the number of quantized weight parameters.
    """
    config = require_lrpq_config(model)
    layer_bits = config.layer_bits
    patch_embedding = get_adapter(model).layout(model).patch_embedding
    names = [n for n in weight_layer_names(layer_bits) if n != patch_embedding]
    sizes = {n: _numel(model.get_submodule(n)) for n in names}
    channels = getattr(model.config, "num_channels", 3)
    size = getattr(model.config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    param = next(model.parameters())
    example = torch.zeros(1, channels, height, width, dtype=param.dtype, device=param.device)
    macs = layer_macs(model, names, example)
    total_size, total_macs = sum(sizes.values()), sum(macs.values())
    return {
        "weight_bits": sum(layer_bits[n]["weight"] * sizes[n] for n in names) / total_size,
        "activation_bits": sum(layer_bits[n]["activation"] * macs[n] for n in names) / total_macs,
        "quantized_weights": total_size,
    }


def _numel(module) -> int:
    shape = getattr(module, "weight_shape", None)  # a quantized layer: no float weight to count
    return module.weight.numel() if shape is None else math.prod(shape)


