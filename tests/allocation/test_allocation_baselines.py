"""Tests for the baseline allocations: `uniform_bits` and `random_bits`."""

from __future__ import annotations

import pytest
from allocation_cases import BITS, swin_costs, vit_costs, within_budget

from optimum_lrpq.allocation import LayerCost, random_bits, uniform_bits


@pytest.mark.parametrize("couple", [True, False])
def test_random_bits_feasible_and_seed_deterministic(couple):
    costs = swin_costs()
    kwargs = {"weight_budget": 4.5, "activation_budget": 4.2, "candidate_bits": BITS, "couple": couple}
    first = random_bits(costs, seed=7, **kwargs)
    assert first == random_bits(costs, seed=7, **kwargs)
    assert first != random_bits(costs, seed=8, **kwargs)
    assert within_budget(first, costs, 4.5, 4.2)
    assert all(w in BITS and a in BITS for w, a in first.values())
    assert couple == all(w == a for w, a in first.values())
    assert len(set(first.values())) > 1


def test_random_bits_rejects_infeasible_budget():
    with pytest.raises(ValueError, match="activation_budget=2 is below the smallest achievable average of 3 bits"):
        random_bits(vit_costs(blocks=1), weight_budget=4, activation_budget=2, candidate_bits=BITS, seed=0)


def test_uniform_bits():
    costs = [LayerCost("a", 1, 3), LayerCost("b", 3, 1)]
    assert uniform_bits(costs, 4, 6) == {"a": (4, 6), "b": (4, 6)}
    with pytest.raises(ValueError, match="weight_bits must be between 2 and 8 bits, got 1"):
        uniform_bits(costs, 1, 4)
