"""Swin (transformers >= 5.10 layout: `swin.encoder.layers.S.blocks.B...`, patch merging in `layers.S.downsample`)."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, Block, LayerNormGroup, ModelLayout, register_adapter


def swin_layout(model: nn.Module) -> ModelLayout:
    groups, linears, attentions, blocks = [], [], [], []
    for s, stage in enumerate(model.swin.encoder.layers):
        for b in range(len(stage.blocks)):
            p = f"swin.encoder.layers.{s}.blocks.{b}"
            qkv = tuple(f"{p}.attention.{n}" for n in ("q_proj", "k_proj", "v_proj"))
            groups.append(LayerNormGroup(f"{p}.layernorm_before", qkv))
            groups.append(LayerNormGroup(f"{p}.layernorm_after", (f"{p}.mlp.fc1",)))
            linears += [f"{p}.attention.o_proj", f"{p}.mlp.fc2"]
            attentions.append(f"{p}.attention")
            blocks.append(Block(f"{p}.attention", (*qkv, f"{p}.attention.o_proj"), (f"{p}.mlp.fc1", f"{p}.mlp.fc2")))
        if getattr(stage, "downsample", None) is not None:
            # Patch merging: LayerNorm(4C) -> reduction (Linear 4C -> 2C, no bias; reparameterization adds one).
            p = f"swin.encoder.layers.{s}.downsample"
            groups.append(LayerNormGroup(f"{p}.norm", (f"{p}.reduction",)))
    return ModelLayout(
        patch_embedding="swin.embeddings.patch_embeddings.projection",
        groups=tuple(groups),
        linears=tuple(linears) + ("classifier",),
        attentions=tuple(attentions),
        blocks=tuple(blocks),
        heads=("classifier",),
    )


register_adapter(ArchitectureAdapter("swin", ("SwinForImageClassification",), swin_layout))
