"""Swin (transformers >= 5.10 layout: `swin.encoder.layers.S.blocks.B...`, patch merging in `layers.S.downsample`).

`SwinLayer.forward`: ``h = x + drop_path(un-windowed attention(layernorm_before(x)))`` (drop_path, Identity or
SwinDropPath, is the module whose output meets the skip in token layout), then ``y = h + mlp(layernorm_after(h))``.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, LayerNormGroup, LayoutBuilder, ModelLayout, register_adapter


def swin_layout(model: nn.Module) -> ModelLayout:
    builder = LayoutBuilder()
    for s, stage in enumerate(model.swin.encoder.layers):
        for b in range(len(stage.blocks)):
            builder.add_block(f"swin.encoder.layers.{s}.blocks.{b}", norm1="layernorm_before",
                              norm2="layernorm_after", attention_end="drop_path")
        if getattr(stage, "downsample", None) is not None:
            # Patch merging: LayerNorm(4C) -> reduction (Linear 4C -> 2C, no bias; reparameterization adds one).
            p = f"swin.encoder.layers.{s}.downsample"
            builder.add_group(LayerNormGroup(f"{p}.norm", (f"{p}.reduction",)), conservation_unit=p)
    return builder.build("swin.embeddings.patch_embeddings.projection", ("classifier",))


# Swin pads inputs to a multiple of its window, so other image sizes run too.
register_adapter(ArchitectureAdapter("swin", ("SwinForImageClassification",), swin_layout, fixed_image_size=False))
