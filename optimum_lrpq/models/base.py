"""What the quantizer needs to know about an architecture, and the registry of supported ones.

An adapter turns a model into a `ModelLayout`: module names (as in `model.named_modules()`) of the layers to
quantize and how they connect, for quantization and for LRP relevance alike. Everything architecture-specific lives
in one small file per family (`vit.py`, `swin.py`, `dinov2.py`); adding one means writing a `layout` function (the
`LayoutBuilder` does the bookkeeping of pre-norm transformer blocks) and calling `register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerNormGroup:
    """A LayerNorm whose output feeds only the linears in `consumers` (q/k/v, fc1, patch-merging reduction).

    Its output gets one quantizer shared by all consumers: per channel during calibration, then folded into
    the LayerNorm affine and the consumers' weights (reparameterization).
    """

    layernorm: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """One transformer block by the role of each module (names as in `model.named_modules()`), for the per-block
    bookkeeping of calibration, relevance and allocation."""

    attention: str  # the module that calls the attention function
    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    mlp_activation: str = ""  # the activation module between fc1 and fc2 ("": none to move into fc1)

    @property
    def module(self) -> str:
        """The block module itself: the deepest module holding both its attention and its MLP (block
        reconstruction replays it on its own)."""
        q, fc2 = self.q.split("."), self.fc2.split(".")
        common = []
        for a, b in zip(q, fc2):
            if a != b:
                break
            common.append(a)
        return ".".join(common)

    @property
    def qkv(self) -> tuple[str, str, str]:
        return self.q, self.k, self.v

    @property
    def attention_linears(self) -> tuple[str, str, str, str]:
        return self.q, self.k, self.v, self.o

    @property
    def mlp_linears(self) -> tuple[str, str]:
        return self.fc1, self.fc2

    @property
    def linears(self) -> tuple[str, ...]:
        """Every weight layer of the block: q, k, v, o, fc1, fc2."""
        return (*self.attention_linears, *self.mlp_linears)


@dataclass(frozen=True)
class ResidualSite:
    """A residual add ``y = skip + branch(skip)`` inside a block's forward (no module of its own), for relevance.

    ``start`` is the branch's first module (its input is the skip tensor: the pre-norm LayerNorm), ``end`` the
    module whose output is added to the skip (element 0 if it returns a tuple; after any LayerScale, i.e. the
    LayerScale itself). ``layers`` are the quantizable layers inside the branch.
    """

    name: str
    start: str
    end: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class ModelLayout:
    patch_embedding: str  # the Conv2d that embeds patches; its input is the image
    groups: tuple[LayerNormGroup, ...]
    linears: tuple[str, ...]  # linears with their own (per-tensor) input quantizer: o_proj, fc2, heads
    attentions: tuple[str, ...]  # modules that call the attention function
    blocks: tuple[Block, ...]
    heads: tuple[str, ...]
    # ---- for LRP relevance (optimum_lrpq.relevance); the defaults describe a model without residual adds.
    residuals: tuple[ResidualSite, ...] = ()  # every residual add, in forward order
    # Modules whose total input relevance must equal their total output relevance (conservation checks), in forward
    # order: transformer blocks, Swin patch merging. The first one's input is the encoder input.
    conservation_units: tuple[str, ...] = ()
    # Share of the start relevance given to each head (aligned with `heads`); empty: 1/len(heads) each.
    # DeiT with teacher: logits = (cls_logits + distillation_logits) / 2, so 1/2 each.
    head_shares: tuple[float, ...] = ()
    # Elementwise per-channel scales (DINOv2 LayerScale, ``y = x * lambda``): relevance crosses them unchanged.
    layer_scales: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.head_shares and len(self.head_shares) != len(self.heads):
            raise ValueError(f"head_shares {self.head_shares} must have one entry per head {self.heads}.")

    def start_shares(self) -> dict[str, float]:
        """``{head: share of the start relevance}`` (empty for a model without a head)."""
        shares = self.head_shares or tuple(1.0 / len(self.heads) for _ in self.heads)
        return dict(zip(self.heads, shares, strict=True))

    def weight_layers(self) -> list[str]:
        """Every layer with a quantized weight, in forward order where it matters little: conv, groups, rest."""
        names = [self.patch_embedding]
        for group in self.groups:
            names.extend(group.consumers)
        names.extend(self.linears)
        return names


class LayoutBuilder:
    """Collects the names of a model's pre-norm transformer blocks (and extra groups), then builds its layout.

    A block ``h = x + attn_end(attention(norm1(x))); y = h + mlp_end(mlp(norm2(h)))`` with q/k/v/o_proj in
    ``attention`` and fc1/fc2 in ``mlp`` is one `add_block` call; names are relative to the block's prefix.
    """

    def __init__(self) -> None:
        self.groups: list[LayerNormGroup] = []
        self.linears: list[str] = []
        self.attentions: list[str] = []
        self.blocks: list[Block] = []
        self.residuals: list[ResidualSite] = []
        self.units: list[str] = []
        self.layer_scales: list[str] = []

    def add_block(self, prefix: str, *, norm1: str, norm2: str, attention_end: str = "attention",
                  mlp_end: str = "mlp", layer_scales: tuple[str, ...] = ()) -> None:
        p = prefix
        block = Block(attention=f"{p}.attention", q=f"{p}.attention.q_proj", k=f"{p}.attention.k_proj",
                      v=f"{p}.attention.v_proj", o=f"{p}.attention.o_proj", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2",
                      mlp_activation=f"{p}.mlp.activation_fn")
        self.groups += [LayerNormGroup(f"{p}.{norm1}", block.qkv), LayerNormGroup(f"{p}.{norm2}", (block.fc1,))]
        self.linears += [block.o, block.fc2]
        self.attentions.append(block.attention)
        self.blocks.append(block)
        self.residuals += [
            ResidualSite(f"{p}.attention", f"{p}.{norm1}", f"{p}.{attention_end}", block.attention_linears),
            ResidualSite(f"{p}.mlp", f"{p}.{norm2}", f"{p}.{mlp_end}", block.mlp_linears),
        ]
        self.units.append(p)
        self.layer_scales += [f"{p}.{name}" for name in layer_scales]

    def add_group(self, group: LayerNormGroup, *, conservation_unit: str | None = None) -> None:
        """A LayerNorm group outside the blocks (Swin patch merging), optionally a conservation unit of its own."""
        self.groups.append(group)
        if conservation_unit is not None:
            self.units.append(conservation_unit)

    def build(self, patch_embedding: str, heads: tuple[str, ...], head_shares: tuple[float, ...] = ()) -> ModelLayout:
        return ModelLayout(
            patch_embedding=patch_embedding,
            groups=tuple(self.groups),
            linears=tuple(self.linears) + heads,
            attentions=tuple(self.attentions),
            blocks=tuple(self.blocks),
            heads=heads,
            residuals=tuple(self.residuals),
            conservation_units=tuple(self.units),
            head_shares=head_shares,
            layer_scales=tuple(self.layer_scales),
        )


@dataclass(frozen=True)
class ArchitectureAdapter:
    model_type: str
    model_classes: tuple[str, ...]
    layout: Callable[[nn.Module], ModelLayout]
    # False when the model accepts other image sizes than `config.image_size` (padding or interpolation).
    fixed_image_size: bool = True
    # Classes of `model_classes` without a classification head (bare backbones): quantizable with uniform bits,
    # but LRP relevance, which starts at the logits, does not apply to them.
    headless_classes: tuple[str, ...] = ()


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> None:
    _ADAPTERS[adapter.model_type] = adapter


def supported_models(*, with_head: bool = False) -> list[str]:
    """Names of the supported model classes; ``with_head=True``: only those with a classification head."""
    return sorted(cls for adapter in _ADAPTERS.values() for cls in adapter.model_classes
                  if not (with_head and cls in adapter.headless_classes))


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`, or a ValueError listing what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None or type(model).__name__ not in adapter.model_classes:
        raise ValueError(
            f"optimum-lrpq does not support {type(model).__name__} (model_type={model_type!r}). "
            f"Supported models: {', '.join(supported_models())}. Load one of these classes, e.g. with "
            "AutoModelForImageClassification, or open an issue to request the architecture."
        )
    return adapter
