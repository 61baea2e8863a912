"""Relevance-driven bit allocation: :func:`allocate_bits`, the exact optimum of the package's objective.

The objective (expected quantization error weighted by relevance, optionally plus measured sensitivities) and its
properties are described in the :mod:`optimum_lrpq.allocation` docstring; this module builds it in exact rationals
and hands it to :mod:`.knapsack`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

from .knapsack import build_knapsack, solve_knapsack
from .problem import (
    Allocation,
    LayerCost,
    budget_headroom,
    check_budget,
    check_candidates,
    check_costs,
    check_fixed,
    normalized_scores,
    sensitivity_rows,
)

__all__ = ["allocate_bits"]


def _expected_error(
    scores: Sequence[Fraction],
    shares: Sequence[Fraction],
    bits: Sequence[int],
    sens: list[list[Fraction]] | None,
    sens_weight: Fraction,
) -> list[list[Fraction]]:
    """ĉ_ℓ·(ω_ℓ·4^(−b) + weight·S_ℓ(b)): relevance-weighted expected quantization error (ω_ℓ = 1 for totals)."""
    rows = []
    for i, (c, share) in enumerate(zip(scores, shares, strict=True)):
        row = []
        for j, b in enumerate(bits):
            value = share * Fraction(1, 4**b)
            if sens is not None:
                value += sens_weight * sens[i][j]
            row.append(c * value)
        rows.append(row)
    return rows


def allocate_bits(
    scores: Mapping[str, float],
    costs: Sequence[LayerCost],
    *,
    weight_budget: float,
    activation_budget: float,
    candidate_bits: Sequence[int] = (3, 4, 5, 6, 8),
    couple: bool = True,
    sensitivity: Mapping[str, Mapping[int, float]] | None = None,
    sensitivity_weight: float = 1.0,
    fixed: Mapping[str, tuple[int, int]] | None = None,
    scores_are_totals: bool = False,
) -> Allocation:
    """Optimal per-layer (weight_bits, activation_bits) under parameter- and MAC-weighted average-bit budgets.

    Args:
        scores: non-negative relevance per layer (any scale; normalised internally; all zero = no preference).
            Layers listed in ``fixed`` need no score; entries for layers not in ``costs`` are ignored.
        costs: the quantizable layers, in model order (ties favour earlier layers).
        weight_budget: parameter-weighted average weight bits may not exceed this.
        activation_budget: MAC-weighted average activation bits may not exceed this.
        candidate_bits: allowed bit widths (2..8).
        couple: one bit width per layer for weights and activations (True) or independent choices (False).
        sensitivity: optional Mix-QViT table ``name -> {bits: loss increase with only that layer at bits}``; every
            candidate must be present for every free layer. Adds ``score·sensitivity_weight·S(b)`` to the cost.
        sensitivity_weight: weight of the sensitivity term relative to the relevance term.
        fixed: layers pinned to ``(weight_bits, activation_bits)``; they count towards the budgets.
        scores_are_totals: the scores are whole-layer totals (LRP relevance), not per-element quantities: the
            expected error is ``score·4^(−b)`` instead of ``score·share·4^(−b)`` (see the package docstring).

    Returns:
        ``name -> (weight_bits, activation_bits)`` for every layer in ``costs``, in the order of ``costs``.

    Raises:
        ValueError: invalid candidates, scores, sensitivities or fixed bits, or a budget below the smallest
            achievable average.
    """
    costs = check_costs(costs)
    bits = check_candidates(candidate_bits)
    w_budget = check_budget(weight_budget, "weight_budget")
    a_budget = check_budget(activation_budget, "activation_budget")
    pinned = check_fixed(fixed, {c.name for c in costs})
    sens_weight = float(sensitivity_weight)
    if not math.isfinite(sens_weight) or sens_weight < 0:
        raise ValueError(f"sensitivity_weight must be a non-negative finite number, got {sensitivity_weight!r}")

    free = [c for c in costs if c.name not in pinned]
    names = [c.name for c in free]
    n_all = [c.num_weights for c in costs]
    m_all = [c.num_macs for c in costs]
    n_fixed = sum(c.num_weights * pinned[c.name][0] for c in costs if c.name in pinned)
    m_fixed = sum(c.num_macs * pinned[c.name][1] for c in costs if c.name in pinned)
    n_free = [c.num_weights for c in free]
    m_free = [c.num_macs for c in free]
    cap_w = budget_headroom(w_budget, n_all, n_fixed, n_free, bits[0], "weight_budget")
    cap_a = budget_headroom(a_budget, m_all, m_fixed, m_free, bits[0], "activation_budget")
    if not free:
        return dict(pinned)

    c_hat = normalized_scores(scores, names)
    sens = sensitivity_rows(sensitivity, names, bits) if sensitivity is not None else None
    n_tot, m_tot = sum(n_all), sum(m_all)
    w_share = [Fraction(n, n_tot) for n in n_free]
    a_share = [Fraction(m, m_tot) for m in m_free]
    # Totals: the error does not scale with the layer's share of the budget (the constraints still do).
    error_w = [Fraction(1)] * len(free) if scores_are_totals else w_share
    error_a = [Fraction(1)] * len(free) if scores_are_totals else a_share

    result: dict[str, tuple[int, int]] = {}
    if couple:
        shares = [(wn + am) / 2 for wn, am in zip(error_w, error_a, strict=True)]
        primary = _expected_error(c_hat, shares, bits, sens, Fraction(sens_weight))
        problem = build_knapsack(primary, bits, min(w_budget, a_budget), [(n_free, cap_w), (m_free, cap_a)])
        chosen = solve_knapsack(problem)
        result = {name: (bits[j], bits[j]) for name, j in zip(names, chosen, strict=True)}
    else:
        half = Fraction(sens_weight) / 2  # the table was measured with weights and activations both at b bits
        primary_w = _expected_error(c_hat, error_w, bits, sens, half)
        primary_a = _expected_error(c_hat, error_a, bits, sens, half)
        chosen_w = solve_knapsack(build_knapsack(primary_w, bits, w_budget, [(n_free, cap_w)]))
        chosen_a = solve_knapsack(build_knapsack(primary_a, bits, a_budget, [(m_free, cap_a)]))
        result = {name: (bits[jw], bits[ja]) for name, jw, ja in zip(names, chosen_w, chosen_a, strict=True)}
    result.update(pinned)
    return {c.name: result[c.name] for c in costs}
