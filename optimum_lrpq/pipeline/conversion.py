"""Module replacement: turn a float model into its quantized form, in memory or as a load-time skeleton.

`layer_bits` (saved in the quantization config) is the single description of what is quantized: a module is
converted if and only if it has an entry. The same function builds the in-memory model during quantization
(`skeleton=False`: float weights kept until `freeze()`) and the empty skeleton that transformers fills from a
checkpoint (`skeleton=True`: meta tensors in the frozen layout), so the two always have identical state dicts.
"""

from __future__ import annotations

from torch import nn

from ..configuration import LRPQConfig
from ..models import ModelLayout
from ..nn import QuantSpec, add_attention_quantizers, quantize_module
from ..nn.attention import QUANTIZER_NAMES as ATTENTION_QUANTIZER_NAMES
from ..nn.fusion import ActivationInProducer, group_shared_input, movable_activation
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


# `head_input_granularity="per_channel"` applies to head inputs of fewer bits than this (see LRPQConfig).
PER_CHANNEL_HEADS_BELOW_BITS = 8


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
        spec = QuantSpec(weight_bits=bits(name, "weight"), input_bits=bits(name, "activation"))
        replaced[name] = _swap(model, name, nn.Conv2d, spec, skeleton)

    for group in layout.groups:
        grouped = group.layernorm in layer_bits
        if grouped:
            per_channel = not (skeleton and config.reparameterize)  # per channel until reparameterized
            spec = QuantSpec(output_bits=bits(group.layernorm, "activation"), output_per_channel=per_channel)
            replaced[group.layernorm] = _swap(model, group.layernorm, nn.LayerNorm, spec, skeleton)
        for consumer in group.consumers:
            if consumer in layer_bits:
                input_bits = None if grouped else bits(consumer, "activation")
                force_bias = grouped and config.reparameterize  # the reparameterization writes a bias
                spec = QuantSpec(weight_bits=bits(consumer, "weight"), input_bits=input_bits, force_bias=force_bias)
                replaced[consumer] = _swap(model, consumer, nn.Linear, spec, skeleton)
                if grouped:
                    layernorm = model.get_submodule(group.layernorm)
                    model.get_submodule(consumer).set_input_source(layernorm.out_quant)
        if grouped:  # q, k and v read the same quantized tensor: one product where the kernel backend can
            group_shared_input([model.get_submodule(c) for c in group.consumers if c in layer_bits])
            if all(c in layer_bits for c in group.consumers):  # no float reader needs the rounded output
                model.get_submodule(group.layernorm).set_consumers([model.get_submodule(c) for c in group.consumers])

    per_channel_inputs = config.linear_input_granularity == "per_channel"
    per_channel_heads = config.head_input_granularity == "per_channel"
    for name in layout.linears:
        if name in layer_bits:
            if name in layout.heads:  # at 8 bits one step per tensor is fine, and 32 vectors per channel clip more
                per_channel = per_channel_heads and bits(name, "activation") < PER_CHANNEL_HEADS_BELOW_BITS
            else:
                per_channel = per_channel_inputs
            spec = QuantSpec(weight_bits=bits(name, "weight"), input_bits=bits(name, "activation"),
                             input_per_channel=per_channel,
                             input_step_levels=config.input_step_levels if per_channel and config.input_step_levels else None)
            replaced[name] = _swap(model, name, nn.Linear, spec, skeleton)

    for block in layout.blocks:
        if block.fc1 in replaced and block.mlp_activation:
            original = _move_activation(model, block.mlp_activation, block.fc1, skeleton)
            if original is not None:
                replaced[block.mlp_activation] = original

    for name in layout.attentions:
        if name in layer_bits:
            attention = model.get_submodule(name)
            device = "meta" if skeleton else _device_of(attention)
            add_attention_quantizers(attention, bits(name, "activation"), config.softmax_quantizer, device=device,
                                     per_head=config.attention_granularity == "per_head",
                                     format_version=config.format_version)
            replaced[name] = attention
    return replaced


def converted_copies(model: nn.Module, replaced: dict[str, nn.Module]) -> set[str]:
    """The names in `convert_model`'s result whose module was swapped for a new one (not the attention modules,
    which only gain quantizers): the modules a later step may edit without touching the caller's originals."""
    return {name for name, original in replaced.items() if model.get_submodule(name) is not original}


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


def _move_activation(model: nn.Module, name: str, producer: str, skeleton: bool) -> nn.Module | None:
    """Move the activation module `name` into the quantized linear `producer` that feeds it (`nn.fusion`); return
    the original module, or None where it is not one the linear can apply (it then stays)."""
    try:
        original = model.get_submodule(name)
    except AttributeError:
        return None
    activation = movable_activation(original)
    if activation is None:
        return None
    model.get_submodule(producer).take_activation(activation)
    placeholder = ActivationInProducer(activation, producer)
    if not skeleton:
        carry_hook(original, placeholder)
    model.set_submodule(name, placeholder)
    return original


def _swap(model: nn.Module, name: str, expected: type[nn.Module], spec: QuantSpec, skeleton: bool) -> nn.Module:
    """Replace module `name` (an `expected` instance) by its quantized twin; return the original."""
    original = model.get_submodule(name)
    if not isinstance(original, expected):
        raise TypeError(f"Expected {name} to be nn.{expected.__name__}, found {type(original).__name__}.")
    new = quantize_module(original, spec, skeleton=skeleton)
    if not skeleton:
        carry_hook(original, new)
    model.set_submodule(name, new)
    return original
