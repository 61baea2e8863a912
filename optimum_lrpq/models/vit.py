"""ViT and DeiT (transformers >= 5.10 layout: `<base>.layers.N.attention.{q,k,v,o}_proj`, `<base>.layers.N.mlp.fc{1,2}`).

`ViTLayer.forward`: ``h = attention(layernorm_before(x)) + x``, then ``y = mlp(layernorm_after(h)) + h``.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, LayoutBuilder, ModelLayout, register_adapter


def _vit_like_layout(model: nn.Module, base: str, heads: tuple[str, ...],
                     head_shares: tuple[float, ...] = ()) -> ModelLayout:
    builder = LayoutBuilder()
    for i in range(len(getattr(model, base).layers)):
        builder.add_block(f"{base}.layers.{i}", norm1="layernorm_before", norm2="layernorm_after")
    return builder.build(f"{base}.embeddings.patch_embeddings.projection", heads, head_shares)


def vit_layout(model: nn.Module) -> ModelLayout:
    return _vit_like_layout(model, "vit", ("classifier",))


def deit_layout(model: nn.Module) -> ModelLayout:
    if hasattr(model, "cls_classifier"):
        # logits = (cls_logits + distillation_logits) / 2: each head starts with half of the relevance.
        return _vit_like_layout(model, "deit", ("cls_classifier", "distillation_classifier"), (0.5, 0.5))
    return _vit_like_layout(model, "deit", ("classifier",))


register_adapter(ArchitectureAdapter("vit", ("ViTForImageClassification",), vit_layout))
register_adapter(
    ArchitectureAdapter("deit", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), deit_layout)
)
