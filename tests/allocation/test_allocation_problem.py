"""Tests for the allocation inputs: LayerCost, the checks on scores, candidates, budgets and fixed layers, averages."""

from __future__ import annotations

import math
import re

import pytest
from allocation_cases import BITS, dirichlet_scores, vit_costs

from optimum_lrpq.allocation import LayerCost, allocate_bits, average_bits


def test_budget_below_smallest_candidate():
    costs = vit_costs(blocks=2)
    message = (
        "weight_budget=2.5 is below the smallest achievable average of 3 bits "
        "(free layers at the smallest candidate, 3 bits, fixed layers at their pinned bits)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate_bits(dirichlet_scores(costs, 0), costs, weight_budget=2.5, activation_budget=4)
    message = message.replace("weight_budget=2.5", "activation_budget=2.999")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate_bits(dirichlet_scores(costs, 0), costs, weight_budget=4, activation_budget=2.999, couple=False)


def test_budget_below_smallest_achievable_with_fixed_layers():
    costs = [LayerCost("a", 10, 10), LayerCost("b", 30, 30)]
    # a pinned at 8 bits, b at the smallest candidate 4: (10·8 + 30·4) / 40 = 5
    message = (
        "weight_budget=4.5 is below the smallest achievable average of 5 bits "
        "(free layers at the smallest candidate, 4 bits, fixed layers at their pinned bits)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate_bits(
            {"b": 1.0}, costs, weight_budget=4.5, activation_budget=8, candidate_bits=(4, 6), fixed={"a": (8, 8)}
        )


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ((), "candidate_bits must not be empty"),
        ((3, 9), "candidate bits must be between 2 and 8 bits, got 9."),
        ((1, 4), "candidate bits must be between 2 and 8 bits, got 1."),
        ((4.0,), "candidate bits must be an integer between 2 and 8, got 4.0 (float)."),
    ],
)
def test_invalid_candidate_bits(bits, message):
    costs = vit_costs(blocks=1)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate_bits({c.name: 1.0 for c in costs}, costs, weight_budget=4, activation_budget=4, candidate_bits=bits)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("missing", "scores has no entry for layer '0.fc1'"),
        (-0.5, "score of layer '0.fc1' must be finite and non-negative, got -0.5"),
        (math.nan, "score of layer '0.fc1' must be finite and non-negative, got nan"),
        (math.inf, "score of layer '0.fc1' must be finite and non-negative, got inf"),
    ],
)
def test_invalid_scores_name_the_layer(bad, message):
    costs = vit_costs(blocks=1)
    scores = {c.name: 1.0 for c in costs}
    if bad == "missing":
        del scores["0.fc1"]
    else:
        scores["0.fc1"] = bad
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate_bits(scores, costs, weight_budget=4, activation_budget=4)


def test_invalid_costs_and_budgets():
    with pytest.raises(ValueError, match="num_weights must be a positive integer"):
        LayerCost("x", 0, 5)
    with pytest.raises(ValueError, match="num_macs must be a positive integer"):
        LayerCost("x", 5, 2.5)
    with pytest.raises(ValueError, match="costs must contain at least one layer"):
        allocate_bits({}, [], weight_budget=4, activation_budget=4)
    with pytest.raises(ValueError, match="duplicate layer name 'x'"):
        allocate_bits({"x": 1}, [LayerCost("x", 1, 1)] * 2, weight_budget=4, activation_budget=4)
    with pytest.raises(ValueError, match="weight_budget must be a positive finite number, got nan"):
        allocate_bits({"x": 1}, [LayerCost("x", 1, 1)], weight_budget=math.nan, activation_budget=4)


def test_sensitivity_errors():
    costs = vit_costs(blocks=1)
    scores = {c.name: 1.0 for c in costs}
    sens = {c.name: {b: 0.1 for b in BITS} for c in costs}
    del sens["0.o"][5]
    with pytest.raises(ValueError, match=re.escape("sensitivity of layer '0.o' lacks candidate bits [5]")):
        allocate_bits(scores, costs, weight_budget=4, activation_budget=4, sensitivity=sens)
    del sens["0.o"]
    with pytest.raises(ValueError, match=re.escape("sensitivity has no entry for layer '0.o'")):
        allocate_bits(scores, costs, weight_budget=4, activation_budget=4, sensitivity=sens)
    sens["0.o"] = {b: math.nan for b in BITS}
    with pytest.raises(ValueError, match=re.escape("sensitivity of layer '0.o' at 3 bits must be finite")):
        allocate_bits(scores, costs, weight_budget=4, activation_budget=4, sensitivity=sens)
    with pytest.raises(ValueError, match="sensitivity_weight must be a non-negative finite number"):
        allocate_bits(scores, costs, weight_budget=4, activation_budget=4, sensitivity_weight=-1)


def test_fixed_errors():
    costs = [LayerCost("a", 10, 10), LayerCost("b", 10, 10)]
    with pytest.raises(ValueError, match="fixed layer 'zz' is not in costs"):
        allocate_bits({}, costs, weight_budget=6, activation_budget=6, fixed={"zz": (4, 4)})
    with pytest.raises(ValueError, match="fixed activation bits of layer 'a' must be between 2 and 8 bits, got 9"):
        allocate_bits({"b": 1}, costs, weight_budget=6, activation_budget=6, fixed={"a": (4, 9)})


def test_average_bits():
    costs = [LayerCost("a", 1, 3), LayerCost("b", 3, 1)]
    assert average_bits({"a": (8, 8), "b": (4, 4)}, costs) == (5.0, 7.0)
    with pytest.raises(ValueError, match="allocation has no entry for layer 'b'"):
        average_bits({"a": (8, 8)}, costs)
