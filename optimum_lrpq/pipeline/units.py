"""Allocation units: the layers that must share bits, and the `layer_bits` entries one unit's choice sets.

Layers that read one shared activation quantizer must get the same activation bits: q, k and v read the same
post-LayerNorm output, so each LayerNorm group (q/k/v, fc1, Swin's reduction) is one unit. o_proj, fc2 and the heads
are units of their own. The attention operands (q, k, v, probabilities) of a block take the bits of its q/k/v unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import ModelLayout


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]
    layernorm: str | None  # the shared input quantizer's LayerNorm, for groups


def allocation_units(layout: ModelLayout, layer_bits: dict[str, dict[str, int]]) -> list[Unit]:
    """Units over the layers that `layer_bits` quantizes (the patch embedding excluded)."""
    units = []
    for group in layout.groups:
        kept = tuple(c for c in group.consumers if c in layer_bits)
        if group.layernorm in layer_bits:
            units.append(Unit(group.layernorm, kept, group.layernorm))
        else:
            units += [Unit(c, (c,), None) for c in kept]
    units += [Unit(name, (name,), None) for name in layout.linears if name in layer_bits]
    return units


def unit_layer_bits(unit: Unit, layout: ModelLayout, uniform_bits: dict[str, dict[str, int]], weight_bits: int,
                    activation_bits: int) -> dict[str, dict[str, int]]:
    """The `layer_bits` entries of `unit` at these bits: its layers, its LayerNorm's output quantizer, and the
    attention quantizers of the block whose q_proj it holds (if `uniform_bits` quantizes that attention)."""
    out: dict[str, dict[str, int]] = {}
    for layer in unit.layers:
        out[layer] = {"weight": weight_bits, "activation": activation_bits}
    if unit.layernorm is not None:
        out[unit.layernorm] = {"activation": activation_bits}
    for block in layout.blocks:
        if block.q in unit.layers and block.attention in uniform_bits:
            out[block.attention] = {"activation": activation_bits}
    return out
