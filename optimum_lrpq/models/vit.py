"""ViT and DeiT (transformers >= 5.10 layout: `<base>.layers.N.attention.{q,k,v,o}_proj`, `<base>.layers.N.mlp.fc{1,2}`)."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, Block, LayerNormGroup, ModelLayout, register_adapter


def _vit_like_layout(model: nn.Module, base: str, heads: tuple[str, ...]) -> ModelLayout:
    encoder_layers = getattr(model, base).layers
    groups, linears, attentions, blocks = [], [], [], []
    for i in range(len(encoder_layers)):
        p = f"{base}.layers.{i}"
        qkv = tuple(f"{p}.attention.{n}" for n in ("q_proj", "k_proj", "v_proj"))
        groups.append(LayerNormGroup(f"{p}.layernorm_before", qkv))
        groups.append(LayerNormGroup(f"{p}.layernorm_after", (f"{p}.mlp.fc1",)))
        linears += [f"{p}.attention.o_proj", f"{p}.mlp.fc2"]
        attentions.append(f"{p}.attention")
        blocks.append(Block(f"{p}.attention", (*qkv, f"{p}.attention.o_proj"), (f"{p}.mlp.fc1", f"{p}.mlp.fc2")))
    return ModelLayout(
        patch_embedding=f"{base}.embeddings.patch_embeddings.projection",
        groups=tuple(groups),
        linears=tuple(linears) + heads,
        attentions=tuple(attentions),
        blocks=tuple(blocks),
        heads=heads,
    )


def vit_layout(model: nn.Module) -> ModelLayout:
    return _vit_like_layout(model, "vit", ("classifier",))


def deit_layout(model: nn.Module) -> ModelLayout:
    heads = ("cls_classifier", "distillation_classifier") if hasattr(model, "cls_classifier") else ("classifier",)
    return _vit_like_layout(model, "deit", heads)


register_adapter(ArchitectureAdapter("vit", ("ViTForImageClassification",), vit_layout))
register_adapter(
    ArchitectureAdapter("deit", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), deit_layout)
)
