"""DINOv2 (`Dinov2ForImageClassification` and the bare `Dinov2Model` backbone).

Layout: `<base>.encoder.layer.N.{norm1, attention.{q,k,v,o}_proj, layer_scale1, norm2, mlp.fc{1,2}, layer_scale2}`;
`Dinov2Layer.forward`: ``h = x + drop_path(layer_scale1(attention(norm1(x))))``, then
``y = h + drop_path(layer_scale2(mlp(norm2(h))))`` (drop_path is the identity in eval mode).
LayerScale stays in floating point: it scales output channels of o_proj / fc2, and per-output-channel weight
quantization is invariant to a per-row scale, so folding it into the weights would change nothing but rounding.
For relevance it is an elementwise scale (relevance crosses it unchanged) and the end of its residual branch.
The head reads ``concat(CLS token, mean of the patch tokens)`` of the final LayerNorm's output.
DINOv2 interpolates its position embeddings, so any image size that is a multiple of the patch size works.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, LayoutBuilder, ModelLayout, register_adapter


def dinov2_layout(model: nn.Module) -> ModelLayout:
    has_head = hasattr(model, "dinov2")
    base = "dinov2." if has_head else ""
    backbone = model.dinov2 if has_head else model
    if getattr(backbone.config, "use_swiglu_ffn", False):
        raise ValueError("optimum-lrpq supports DINOv2 with the GELU MLP (fc1/fc2), not use_swiglu_ffn=True "
                         "(the giant variants).")
    builder = LayoutBuilder()
    for i in range(len(backbone.encoder.layer)):
        builder.add_block(f"{base}encoder.layer.{i}", norm1="norm1", norm2="norm2", attention_end="layer_scale1",
                          mlp_end="layer_scale2", layer_scales=("layer_scale1", "layer_scale2"))
    return builder.build(f"{base}embeddings.patch_embeddings.projection", ("classifier",) if has_head else ())


register_adapter(
    ArchitectureAdapter("dinov2", ("Dinov2ForImageClassification", "Dinov2Model"), dinov2_layout,
                        fixed_image_size=False, headless_classes=("Dinov2Model",))
)
