"""Module replacement: turn a float model into its quantized form, in memory or as a load-time skeleton.

`layer_bits` (saved in the quantization config) is the single description of what is quantized: a module is
converted if and only if it has an entry. The same function builds the in-memory model during quantization
(`skeleton=False`: float weights kept until `freeze()`) and the empty skeleton that transformers fills from a
checkpoint (`skeleton=True`: meta tensors in the frozen layout), so the two always have identical state dicts.
"""

from __future__ import annotations

from torch import nn

from .configuration import LRPQConfig
from .models import ModelLayout
from .nn import QuantConv2d, QuantLayerNorm, QuantLinear, add_attention_quantizers
from .nn.attention import QUANTIZER_NAMES as ATTENTION_QUANTIZER_NAMES
from .placement import carry_hook


def is_excluded(name: str, modules_to_not_convert: list[str] | None) -> bool:
    """A module stays float if an entry equals its name, is a dotted prefix of it, or is a dotted suffix of it."""
    for entry in modules_to_not_convert or ():
        if name == entry or name.startswith(entry + ".") or name.endswith("." + entry):
            return True
    return False


def plan_layer_bits(layout: ModelLayout, config: LRPQConfig) -> dict[str, dict[str, int]]:
    """Uniform bits for every quantizable module not excluded by `modules_to_not_convert`.

    Entries: weight layers get {"weight", "activation"} (activation = bits of their input); LayerNorms whose
    output is quantized and attention modules (q, k, v, probabilities) get {"activation"}.
    """
    w, a = config.weight_bits, config.activation_bits
    skip = config.modules_to_not_convert
    bits: dict[str, dict[str, int]] = {}
    if not is_excluded(layout.patch_embedding, skip):
        bits[layout.patch_embedding] = {"weight": w, "activation": config.patch_embedding_input_bits}
    for group in layout.groups:
        kept = [c for c in group.consumers if not is_excluded(c, skip)]
        for consumer in kept:
            bits[consumer] = {"weight": w, "activation": a}
        # The shared output quantizer only exists when every consumer is quantized.
        if len(kept) == len(group.consumers) and not is_excluded(group.layernorm, skip):
            bits[group.layernorm] = {"activation": a}
    for name in layout.linears:
        if not is_excluded(name, skip):
            bits[name] = {"weight": w, "activation": a}
    for name in layout.attentions:
        if not is_excluded(name, skip):
            bits[name] = {"activation": a}
    return bits


def known_module_names(layout: ModelLayout) -> set[str]:
    names = {layout.patch_embedding, *layout.linears, *layout.attentions}
    for group in layout.groups:
        names.add(group.layernorm)
        names.update(group.consumers)
    return names


def convert_model(
    model: nn.Module, layout: ModelLayout, layer_bits: dict[str, dict[str, int]], config: LRPQConfig, *, skeleton: bool
) -> dict[str, nn.Module]:
    """Replace, in place, every module named in `layer_bits` by its quantized counterpart.

    Returns the replaced modules by name, so that `restore_model` can undo the conversion if a later step fails.
    """
    unknown = set(layer_bits) - known_module_names(layout)
    if unknown:
        raise ValueError(
            f"The quantization config names layers that {type(model).__name__} does not have: {sorted(unknown)[:5]}. "
            "The checkpoint does not match this model class, or was written for another version of transformers."
        )

    replaced: dict[str, nn.Module] = {}

    def bits(name: str, kind: str) -> int:
        entry = layer_bits[name]
        if kind not in entry:
            raise ValueError(f"layer_bits[{name!r}] lacks {kind!r} bits; the quantization config is incomplete.")
        return entry[kind]

    if layout.patch_embedding in layer_bits:
        name = layout.patch_embedding
        replaced[name] = _replace_conv(model, name, bits(name, "weight"), bits(name, "activation"), skeleton)

    for group in layout.groups:
        grouped = group.layernorm in layer_bits
        if grouped:
            per_channel = not (skeleton and config.reparameterize)  # per channel until reparameterized
            replaced[group.layernorm] = _replace_layernorm(
                model, group.layernorm, bits(group.layernorm, "activation"), per_channel, skeleton
            )
        for consumer in group.consumers:
            if consumer in layer_bits:
                input_bits = None if grouped else bits(consumer, "activation")
                force_bias = grouped and config.reparameterize  # the reparameterization writes a bias
                replaced[consumer] = _replace_linear(
                    model, consumer, bits(consumer, "weight"), input_bits, force_bias, skeleton
                )

    # Heads see one token (or pooled vector) per image: too few rows to calibrate a range per channel.
    per_channel_inputs = config.linear_input_granularity == "per_channel"
    for name in layout.linears:
        if name in layer_bits:
            per_channel = per_channel_inputs and name not in layout.heads
            replaced[name] = _replace_linear(model, name, bits(name, "weight"), bits(name, "activation"), False,
                                             skeleton, input_per_channel=per_channel)

    for name in layout.attentions:
        if name in layer_bits:
            attention = model.get_submodule(name)
            device = "meta" if skeleton else _device_of(attention)
            add_attention_quantizers(attention, bits(name, "activation"), config.softmax_quantizer, device=device,
                                     per_head=config.attention_granularity == "per_head")
            replaced[name] = attention
    return replaced


def restore_model(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo `convert_model`: put the original modules back and detach the attention quantizers."""
    for name, original in replaced.items():
        if model.get_submodule(name) is original:  # an attention module: only children were added
            for child in ATTENTION_QUANTIZER_NAMES:
                if hasattr(original, child):
                    delattr(original, child)
        else:
            model.set_submodule(name, original)


def _device_of(module: nn.Module):
    for tensor in module.parameters():
        return tensor.device
    return None


def _swap(model, name, expected: type, build_skeleton, build_quantized, skeleton: bool):
    """Replace module `name` (an `expected` instance) by its quantized counterpart; return the original."""
    original = model.get_submodule(name)
    if not isinstance(original, expected):
        raise TypeError(f"Expected {name} to be nn.{expected.__name__}, found {type(original).__name__}.")
    if skeleton:
        new = build_skeleton(original)
    else:
        new = build_quantized(original)
        carry_hook(original, new)
    model.set_submodule(name, new)
    return original


def _replace_linear(model, name, weight_bits, input_bits, force_bias, skeleton, input_per_channel=False):
    return _swap(
        model, name, nn.Linear,
        lambda m: QuantLinear(m.in_features, m.out_features, m.bias is not None or force_bias, weight_bits,
                              input_bits, dtype=m.weight.dtype, device="meta", input_per_channel=input_per_channel),
        lambda m: QuantLinear.from_float(m, weight_bits, input_bits, force_bias=force_bias,
                                         input_per_channel=input_per_channel),
        skeleton,
    )


def _replace_conv(model, name, weight_bits, input_bits, skeleton):
    return _swap(
        model, name, nn.Conv2d,
        lambda m: QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              m.groups, m.bias is not None, weight_bits, input_bits, dtype=m.weight.dtype,
                              device="meta"),
        lambda m: QuantConv2d.from_float(m, weight_bits, input_bits),
        skeleton,
    )


def _replace_layernorm(model, name, out_bits, per_channel, skeleton):
    return _swap(
        model, name, nn.LayerNorm,
        lambda m: QuantLayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None, out_bits,
                                 per_channel, dtype=m.weight.dtype, device="meta"),
        lambda m: QuantLayerNorm.from_float(m, out_bits, per_channel),
        skeleton,
    )
