"""Baseline allocations to compare relevance against: every layer at the same bits, a random feasible allocation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..options import check_bits
from .problem import Allocation, LayerCost, budget_headroom, check_budget, check_candidates, check_costs

__all__ = ["random_bits", "uniform_bits"]


def uniform_bits(costs: Sequence[LayerCost], weight_bits: int, activation_bits: int) -> Allocation:
    """Every layer at the same (weight_bits, activation_bits)."""
    costs = check_costs(costs)
    pair = (check_bits(weight_bits, "weight_bits"), check_bits(activation_bits, "activation_bits"))
    return {c.name: pair for c in costs}


def random_bits(
    costs: Sequence[LayerCost],
    *,
    weight_budget: float,
    activation_budget: float,
    candidate_bits: Sequence[int] = (3, 4, 5, 6, 8),
    seed: int,
    couple: bool = True,
) -> Allocation:
    """Random feasible allocation at the same budgets (baseline for "does relevance matter?").

    Starts from every layer at the smallest candidate and applies uniformly random upgrades (layer and target
    candidate) while any upgrade still fits, so the budget is used about as fully as by :func:`allocate_bits`.
    Deterministic for a given ``seed``.
    """
    costs = check_costs(costs)
    bits = check_candidates(candidate_bits)
    w_budget = check_budget(weight_budget, "weight_budget")
    a_budget = check_budget(activation_budget, "activation_budget")
    n = [c.num_weights for c in costs]
    m = [c.num_macs for c in costs]
    left_w = budget_headroom(w_budget, n, 0, n, bits[0], "weight_budget")
    left_a = budget_headroom(a_budget, m, 0, m, bits[0], "activation_budget")
    rng = np.random.default_rng(seed)
    # Each layer has one (coupled) or two (weight, activation) independent bit choices, each tied to its resources.
    slots = [(i, 0) for i in range(len(costs))] + ([] if couple else [(i, 1) for i in range(len(costs))])
    level = {slot: 0 for slot in slots}
    while True:
        moves = []
        for slot in slots:
            i, kind = slot
            for j in range(level[slot] + 1, len(bits)):
                step = bits[j] - bits[level[slot]]
                need_w = n[i] * step if couple or kind == 0 else 0
                need_a = m[i] * step if couple or kind == 1 else 0
                if need_w <= left_w and need_a <= left_a:
                    moves.append((slot, j, need_w, need_a))
        if not moves:
            break
        slot, j, need_w, need_a = moves[int(rng.integers(len(moves)))]
        level[slot], left_w, left_a = j, left_w - need_w, left_a - need_a
    if couple:
        return {c.name: (bits[level[(i, 0)]],) * 2 for i, c in enumerate(costs)}
    return {c.name: (bits[level[(i, 0)]], bits[level[(i, 1)]]) for i, c in enumerate(costs)}
