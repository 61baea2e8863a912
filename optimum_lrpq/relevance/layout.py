"""Which models relevance supports, and where it has to be steered in them: the architecture adapters' layout.

Every architecture fact (residual adds, conservation units, heads and their start shares, LayerScales, the
quantizable layers) comes from ``optimum_lrpq.models``; this module only checks what relevance needs on top of the
layout: a model with a Linear classification head, where relevance starts.
"""

from __future__ import annotations

from torch import nn

from ..models import ModelLayout, get_adapter, supported_models

SUPPORTED_MODELS: tuple[str, ...] = tuple(supported_models(with_head=True))
"""Names of the model classes ``compute_relevance`` accepts (the registered ones that have a classification head)."""


def relevance_layout(model: nn.Module) -> ModelLayout:
    """The adapter layout of a model relevance supports; ``ValueError`` for anything else."""
    name = type(model).__name__
    try:
        adapter = get_adapter(model)
    except ValueError:
        raise ValueError(f"compute_relevance does not support {name}; supported models: "
                         f"{', '.join(supported_models(with_head=True))}.") from None
    layout = adapter.layout(model)  # may refuse a variant of a supported class itself (e.g. DINOv2 with SwiGLU)
    if not layout.heads:
        raise ValueError(
            f"compute_relevance needs a classification head: relevance starts at the logits, and {name} has none. "
            f"Load the model with a head (e.g. {name.removesuffix('Model')}ForImageClassification); quantization "
            "with uniform bits (mixed_precision=False) works on the bare backbone."
        )
    modules = dict(model.named_modules())
    for head in layout.heads:
        if not isinstance(modules[head], nn.Linear):
            raise ValueError(
                f"compute_relevance needs a Linear classification head, but `{head}` is "
                f"{type(modules[head]).__name__} (num_labels=0?)."
            )
    return layout


def quantizable_layers(model: nn.Module, layout: ModelLayout | None = None) -> list[str]:
    """The layers with a quantized weight (``layout.weight_layers()``), in ``named_modules()`` order: the keys of
    the scores."""
    layout = relevance_layout(model) if layout is None else layout
    wanted = set(layout.weight_layers())
    names = [name for name, _ in model.named_modules() if name in wanted]
    if len(names) != len(wanted):
        missing = sorted(wanted.difference(names))
        raise ValueError(f"The layout of {type(model).__name__} names layers the model does not have: {missing}.")
    return names
