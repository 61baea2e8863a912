"""The allocation problem's inputs: layer sizes, the checks every entry point applies, budgets and averages.

A layer's weight bits are weighted by its parameter count, its activation bits by its MACs per image
(:class:`LayerCost`); an allocation maps each layer name to ``(weight_bits, activation_bits)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..options import check_bits

__all__ = [
    "Allocation",
    "LayerCost",
    "average_bits",
    "budget_headroom",
    "check_budget",
    "check_candidates",
    "check_costs",
    "check_fixed",
    "normalized_scores",
    "sensitivity_rows",
]

Allocation = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class LayerCost:
    """One quantizable layer: its parameter count (weight budget) and MACs per image (activation budget)."""

    name: str
    num_weights: int
    num_macs: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LayerCost name must be a non-empty string, got {self.name!r}")
        for field in ("num_weights", "num_macs"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LayerCost {self.name!r}: {field} must be a positive integer, got {value!r}")
            object.__setattr__(self, field, int(value))  # numpy ints would overflow silently in the sums


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------


def check_candidates(candidate_bits: Sequence[int]) -> tuple[int, ...]:
    """The distinct candidate widths, sorted; ValueError if empty or any is not an integer in MIN_BITS..MAX_BITS."""
    bits = tuple(candidate_bits)
    if not bits:
        raise ValueError("candidate_bits must not be empty")
    for b in bits:
        check_bits(b, "candidate bits")
    return tuple(sorted({int(b) for b in bits}))


def check_costs(costs: Sequence[LayerCost]) -> tuple[LayerCost, ...]:
    """`costs` as a tuple; ValueError if empty or a layer name repeats, TypeError for a non-LayerCost entry."""
    costs = tuple(costs)
    if not costs:
        raise ValueError("costs must contain at least one layer")
    seen: set[str] = set()
    for cost in costs:
        if not isinstance(cost, LayerCost):
            raise TypeError(f"costs must contain LayerCost objects, got {type(cost).__name__}")
        if cost.name in seen:
            raise ValueError(f"duplicate layer name {cost.name!r} in costs")
        seen.add(cost.name)
    return costs


def check_budget(value: float, what: str) -> Fraction:
    """An average-bit budget as an exact rational; ValueError unless it is positive and finite."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return Fraction(value)


def check_fixed(fixed: Mapping[str, tuple[int, int]] | None, names: set[str]) -> dict[str, tuple[int, int]]:
    """Pinned ``name -> (weight_bits, activation_bits)`` for layers in `names`; ValueError for anything else."""
    out: dict[str, tuple[int, int]] = {}
    for name, pair in (fixed or {}).items():
        if name not in names:
            raise ValueError(f"fixed layer {name!r} is not in costs")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"fixed bits for layer {name!r} must be a (weight_bits, activation_bits) pair")
        out[name] = (
            check_bits(pair[0], f"fixed weight bits of layer {name!r}"),
            check_bits(pair[1], f"fixed activation bits of layer {name!r}"),
        )
    return out


def normalized_scores(scores: Mapping[str, float], names: Sequence[str]) -> list[Fraction]:
    """Exact scores normalised to sum 1; all-zero scores carry no preference and are treated as equal."""
    raw: list[Fraction] = []
    for name in names:
        if name not in scores:
            raise ValueError(f"scores has no entry for layer {name!r}")
        value = float(scores[name])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"score of layer {name!r} must be finite and non-negative, got {value!r}")
        raw.append(Fraction(value))
    total = sum(raw, Fraction(0))
    if total == 0:
        return [Fraction(1, len(raw))] * len(raw)
    return [r / total for r in raw]


def sensitivity_rows(
    sensitivity: Mapping[str, Mapping[int, float]], names: Sequence[str], bits: Sequence[int]
) -> list[list[Fraction]]:
    """Exact sensitivity per layer of `names` and candidate of `bits`; ValueError for a missing or non-finite entry."""
    rows = []
    for name in names:
        if name not in sensitivity:
            raise ValueError(f"sensitivity has no entry for layer {name!r}")
        table = sensitivity[name]
        missing = [b for b in bits if b not in table]
        if missing:
            raise ValueError(f"sensitivity of layer {name!r} lacks candidate bits {missing}")
        row = []
        for b in bits:
            value = float(table[b])
            if not math.isfinite(value):
                raise ValueError(f"sensitivity of layer {name!r} at {b} bits must be finite, got {value!r}")
            row.append(Fraction(value))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# budgets and averages
# --------------------------------------------------------------------------------------------------------------


def budget_headroom(
    budget: Fraction, sizes_all: Sequence[int], fixed_use: int, free_sizes: Sequence[int], bmin: int, what: str
) -> int:
    """Budget left above "every free layer at the smallest candidate", in exact integer units; ValueError if < 0."""
    total = sum(sizes_all)
    allowed = math.floor(budget * total)  # Σ size·bits is an integer, so ≤ floor(budget·total) is exact
    minimum = fixed_use + bmin * sum(free_sizes)
    if allowed < minimum:
        smallest = Fraction(minimum, total)
        raise ValueError(
            f"{what}={float(budget):g} is below the smallest achievable average of {float(smallest):.6g} bits "
            f"(free layers at the smallest candidate, {bmin} bits, fixed layers at their pinned bits)"
        )
    return allowed - minimum


def average_bits(allocation: Mapping[str, tuple[int, int]], costs: Sequence[LayerCost]) -> tuple[float, float]:
    """(parameter-weighted average weight bits, MAC-weighted average activation bits) of an allocation."""
    costs = check_costs(costs)
    for c in costs:
        if c.name not in allocation:
            raise ValueError(f"allocation has no entry for layer {c.name!r}")
    n_tot = sum(c.num_weights for c in costs)
    m_tot = sum(c.num_macs for c in costs)
    w = sum(c.num_weights * allocation[c.name][0] for c in costs)
    a = sum(c.num_macs * allocation[c.name][1] for c in costs)
    return float(Fraction(w, n_tot)), float(Fraction(a, m_tot))
