"""Where relevance has to be steered in each supported model (module names as in ``model.named_modules()``).

Only the places that autograd would get wrong need naming: residual adds (inside ``ViTLayer.forward`` /
``SwinLayer.forward``, no module of their own), the heads where relevance starts, and the blocks whose in/out
totals are recorded for conservation checks. Everything else is found by module type (see ``propagation``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinForImageClassification,
    ViTForImageClassification,
)

SUPPORTED_MODELS: tuple[type[nn.Module], ...] = (
    ViTForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinForImageClassification,
)


@dataclass(frozen=True)
class ResidualSite:
    """``y = skip + branch(skip)``: ``start`` is the branch's first module (its input is the skip tensor), ``end``
    the module whose output is added to the skip (element 0 if it returns a tuple). ``layers`` are the quantizable
    layers inside the branch."""

    name: str
    start: str
    end: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class RelevanceLayout:
    residuals: tuple[ResidualSite, ...]
    blocks: tuple[str, ...]  # conservation units, in forward order: transformer blocks, Swin patch merging
    heads: tuple[tuple[str, float], ...]  # (head module, share of the start relevance)


def supported_names() -> str:
    return ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)


def check_supported(model: nn.Module) -> None:
    if not isinstance(model, SUPPORTED_MODELS):
        raise ValueError(
            f"compute_relevance does not support {type(model).__name__}; supported models: {supported_names()}."
        )


def _linears_under(model: nn.Module, prefix: str) -> tuple[str, ...]:
    return tuple(n for n, m in model.named_modules() if n.startswith(prefix + ".") and isinstance(m, nn.Linear))


def _vit_like_blocks(model: nn.Module, backbone: str, layers: nn.ModuleList) -> tuple[list[ResidualSite], list[str]]:
    residuals, blocks = [], []
    for i in range(len(layers)):
        block = f"{backbone}.layers.{i}"
        blocks.append(block)
        # ViTLayer: attention(layernorm_before(x))[0] + x, then mlp(layernorm_after(h)) + h (dropout is identity).
        residuals.append(ResidualSite(f"{block}.attention", f"{block}.layernorm_before", f"{block}.attention",
                                      _linears_under(model, f"{block}.attention")))
        residuals.append(ResidualSite(f"{block}.mlp", f"{block}.layernorm_after", f"{block}.mlp",
                                      _linears_under(model, f"{block}.mlp")))
    return residuals, blocks


def _swin_blocks(model: SwinForImageClassification) -> tuple[list[ResidualSite], list[str]]:
    residuals, blocks = [], []
    for s, stage in enumerate(model.swin.encoder.layers):
        for b in range(len(stage.blocks)):
            block = f"swin.encoder.layers.{s}.blocks.{b}"
            blocks.append(block)
            # SwinLayer: shortcut + drop_path(un-windowed attention output), then mlp(layernorm_after(h)) + h.
            # drop_path (Identity or SwinDropPath) is the module whose output meets the skip in token layout.
            residuals.append(ResidualSite(f"{block}.attention", f"{block}.layernorm_before", f"{block}.drop_path",
                                          _linears_under(model, f"{block}.attention")))
            residuals.append(ResidualSite(f"{block}.mlp", f"{block}.layernorm_after", f"{block}.mlp",
                                          _linears_under(model, f"{block}.mlp")))
        if stage.downsample is not None:
            blocks.append(f"swin.encoder.layers.{s}.downsample")
    return residuals, blocks


def relevance_layout(model: nn.Module) -> RelevanceLayout:
    """The layout of a supported model; ``ValueError`` for anything else."""
    check_supported(model)
    if isinstance(model, SwinForImageClassification):
        residuals, blocks = _swin_blocks(model)
    else:
        backbone = "vit" if isinstance(model, ViTForImageClassification) else "deit"
        residuals, blocks = _vit_like_blocks(model, backbone, getattr(model, backbone).layers)
    if isinstance(model, DeiTForImageClassificationWithTeacher):
        # logits = (cls_logits + distillation_logits) / 2: each head starts with half of the relevance.
        heads = (("cls_classifier", 0.5), ("distillation_classifier", 0.5))
    else:
        heads = (("classifier", 1.0),)
    modules = dict(model.named_modules())
    for head, _ in heads:
        if not isinstance(modules[head], nn.Linear):
            raise ValueError(f"compute_relevance needs a Linear classification head, but `{head}` is "
                             f"{type(modules[head]).__name__} (num_labels=0?).")
    return RelevanceLayout(tuple(residuals), tuple(blocks), heads)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of the model, in ``named_modules()`` order: the keys of the scores."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
