"""Tests for `allocate_bits`: budgets, exact optimality against brute force, monotonicity, degenerate cases."""

from __future__ import annotations

import itertools
import random
import time
import warnings
from fractions import Fraction

import pytest
from allocation_cases import BITS, dirichlet_scores, swin_costs, vit_costs, within_budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_lrpq.allocation import LayerCost, allocate_bits, average_bits, knapsack, uniform_bits

# ----------------------------------------------------------------------------------------------------------------
# an independent brute-force reference
# ----------------------------------------------------------------------------------------------------------------


def _brute_side(rows, sizes, cap, bits, target):
    """Lexicographic (objective, Σ(b − target)², higher bits earlier) minimum over all feasible choices."""
    best_key, best = None, None
    for combo in itertools.product(range(len(bits)), repeat=len(rows)):
        if sum(s * bits[j] for s, j in zip(sizes, combo, strict=True)) > cap:
            continue
        key = (
            sum(row[j] for row, j in zip(rows, combo, strict=True)),
            sum((bits[j] - target) ** 2 for j in combo),
            tuple(-j for j in combo),
        )
        if best_key is None or key < best_key:
            best_key, best = key, combo
    return best


def reference(scores, costs, wb, ab, bits, couple=True, sensitivity=None, sw=1.0, fixed=None):
    """Independent brute force of the documented objective: Σ ĉ·(ω·4^−b + sw·S(b)), exact rationals."""
    fixed = fixed or {}
    bits = sorted(set(bits))
    free = [c for c in costs if c.name not in fixed]
    total = sum(Fraction(scores[c.name]) for c in free)
    c_hat = [Fraction(scores[c.name]) / total if total else Fraction(1, len(free)) for c in free]
    n_tot, m_tot = sum(c.num_weights for c in costs), sum(c.num_macs for c in costs)
    cap_w = Fraction(wb) * n_tot - sum(c.num_weights * fixed[c.name][0] for c in costs if c.name in fixed)
    cap_a = Fraction(ab) * m_tot - sum(c.num_macs * fixed[c.name][1] for c in costs if c.name in fixed)

    def rows(shares, weight):
        out = []
        for ch, share, c in zip(c_hat, shares, free, strict=True):
            sens = sensitivity[c.name] if sensitivity else None
            out.append([ch * (share * Fraction(1, 4**b) + (weight * Fraction(sens[b]) if sens else 0)) for b in bits])
        return out

    w_share = [Fraction(c.num_weights, n_tot) for c in free]
    a_share = [Fraction(c.num_macs, m_tot) for c in free]
    out = dict(fixed)
    if couple:
        shares = [(x + y) / 2 for x, y in zip(w_share, a_share, strict=True)]
        target = min(Fraction(wb), Fraction(ab))
        best_key, best = None, None
        prim = rows(shares, Fraction(sw))
        for combo in itertools.product(range(len(bits)), repeat=len(free)):
            if sum(c.num_weights * bits[j] for c, j in zip(free, combo, strict=True)) > cap_w:
                continue
            if sum(c.num_macs * bits[j] for c, j in zip(free, combo, strict=True)) > cap_a:
                continue
            key = (
                sum(row[j] for row, j in zip(prim, combo, strict=True)),
                sum((bits[j] - target) ** 2 for j in combo),
                tuple(-j for j in combo),
            )
            if best_key is None or key < best_key:
                best_key, best = key, combo
        out.update({c.name: (bits[j], bits[j]) for c, j in zip(free, best, strict=True)})
    else:
        half = Fraction(sw) / 2
        bw = _brute_side(rows(w_share, half), [c.num_weights for c in free], cap_w, bits, Fraction(wb))
        ba = _brute_side(rows(a_share, half), [c.num_macs for c in free], cap_a, bits, Fraction(ab))
        out.update({c.name: (bits[i], bits[j]) for c, i, j in zip(free, bw, ba, strict=True)})
    return {c.name: out[c.name] for c in costs}


# ----------------------------------------------------------------------------------------------------------------
# budgets are never exceeded
# ----------------------------------------------------------------------------------------------------------------

candidate_sets = st.lists(st.sampled_from([2, 3, 4, 5, 6, 7, 8]), min_size=1, max_size=5, unique=True)


@st.composite
def instances(draw, max_layers=8):
    n_layers = draw(st.integers(1, max_layers))
    small = draw(st.booleans())  # small sizes make ties and exact budget hits likely
    size = st.integers(1, 20) if small else st.integers(1, 10**7)
    costs = [LayerCost(f"l{i}", draw(size), draw(size)) for i in range(n_layers)]
    scores = {c.name: draw(st.floats(0, 100, allow_nan=False) | st.just(1.0)) for c in costs}
    bits = sorted(draw(candidate_sets))
    budget = st.floats(bits[0], bits[-1] + 1, allow_nan=False) | st.sampled_from(bits)
    return scores, costs, bits, draw(budget), draw(budget)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.booleans())
def test_budget_never_exceeded(instance, couple):
    scores, costs, bits, wb, ab = instance
    result = allocate_bits(scores, costs, weight_budget=wb, activation_budget=ab, candidate_bits=bits, couple=couple)
    assert list(result) == [c.name for c in costs]
    assert all(w in bits and a in bits for w, a in result.values())
    assert within_budget(result, costs, wb, ab)
    if couple:
        assert all(w == a for w, a in result.values())


def test_budget_never_exceeded_model_shaped():
    for costs in (vit_costs(), swin_costs()):
        for seed, budget in ((0, 3.3), (1, 4.5), (2, 6)):
            for couple in (True, False):
                scores = dirichlet_scores(costs, seed)
                result = allocate_bits(scores, costs, weight_budget=budget, activation_budget=budget, couple=couple)
                assert within_budget(result, costs, budget, budget)


# ----------------------------------------------------------------------------------------------------------------
# optimality against brute force (the full allocation, including the documented tie-breaks)
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_layers=5), st.booleans())
def test_matches_brute_force(instance, couple):
    scores, costs, bits, wb, ab = instance
    got = allocate_bits(scores, costs, weight_budget=wb, activation_budget=ab, candidate_bits=bits, couple=couple)
    assert got == reference(scores, costs, wb, ab, bits, couple=couple)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_six_layers(seed):
    rng = random.Random(seed)
    bits = sorted(rng.sample([2, 3, 4, 5, 6, 8], 4))
    costs = [LayerCost(f"l{i}", rng.randint(1, 5000), rng.randint(1, 10**6)) for i in range(6)]
    scores = {c.name: rng.random() for c in costs}
    wb, ab = rng.uniform(bits[0], bits[-1]), rng.uniform(bits[0], bits[-1])
    couple = seed % 2 == 0
    got = allocate_bits(scores, costs, weight_budget=wb, activation_budget=ab, candidate_bits=bits, couple=couple)
    assert got == reference(scores, costs, wb, ab, bits, couple=couple)


@pytest.mark.parametrize("couple", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_sensitivity_and_fixed(seed, couple):
    rng = random.Random(100 + seed)
    bits = (3, 4, 6, 8)
    costs = [LayerCost(f"l{i}", rng.randint(1, 300), rng.randint(1, 3000)) for i in range(6)]
    scores = {c.name: rng.random() for c in costs}
    sens = {c.name: {b: rng.random() * 2.0 ** (-b) for b in bits} for c in costs}
    fixed = {"l0": (8, 8)}
    kwargs = {"weight_budget": 5.1, "activation_budget": 4.7, "candidate_bits": bits, "couple": couple}
    got = allocate_bits(scores, costs, sensitivity=sens, sensitivity_weight=0.3, fixed=fixed, **kwargs)
    want = reference(scores, costs, 5.1, 4.7, bits, couple, sensitivity=sens, sw=0.3, fixed=fixed)
    assert got == want


# ----------------------------------------------------------------------------------------------------------------
# monotonicity and sensible behaviour
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=24),
    st.floats(3, 7),
    st.booleans(),
)
def test_monotone_in_score_for_identical_costs(raw_scores, budget, couple):
    kinds = [(3, 591), (1, 197), (4, 788)]  # (params, MACs) of qkv / o / fc-like layers
    costs = [LayerCost(f"l{i}", *kinds[i % 3]) for i in range(len(raw_scores))]
    scores = {c.name: s for c, s in zip(costs, raw_scores, strict=True)}
    result = allocate_bits(scores, costs, weight_budget=budget, activation_budget=budget, couple=couple)
    for a, b in itertools.permutations(costs, 2):
        if (a.num_weights, a.num_macs) == (b.num_weights, b.num_macs) and scores[a.name] > scores[b.name]:
            assert result[a.name][0] >= result[b.name][0]
            assert result[a.name][1] >= result[b.name][1]


def test_monotone_on_vit():
    costs = vit_costs()
    scores = dirichlet_scores(costs, 3)
    result = allocate_bits(scores, costs, weight_budget=4, activation_budget=4)
    for a, b in itertools.permutations(costs, 2):
        if (a.num_weights, a.num_macs) == (b.num_weights, b.num_macs) and scores[a.name] > scores[b.name]:
            assert result[a.name] >= result[b.name]


def test_relevant_layers_get_more_bits_and_bits_are_not_extreme():
    costs = vit_costs()
    scores = {c.name: 1.0 for c in costs}
    scores["5.fc1"] = 100.0  # far more relevant
    scores["7.o"] = 0.01  # nearly irrelevant
    result = allocate_bits(scores, costs, weight_budget=4, activation_budget=4)
    assert result["5.fc1"][0] > 4 > result["7.o"][0]
    # concave utility: the bulk of the layers stays at or next to the budget
    assert sum(abs(w - 4) <= 1 for w, _ in result.values()) >= len(costs) - 2


def test_scores_need_not_be_normalized_and_order_does_not_matter():
    costs = swin_costs()
    scores = dirichlet_scores(costs, 5)
    base = allocate_bits(scores, costs, weight_budget=4.5, activation_budget=4.5)
    scaled = {k: v * 1234.5 for k, v in reversed(list(scores.items()))}
    assert allocate_bits(scaled, costs, weight_budget=4.5, activation_budget=4.5) == base


def test_extra_score_entries_are_ignored():
    costs = vit_costs(blocks=2)
    scores = dirichlet_scores(costs, 0)
    got = allocate_bits({**scores, "not.a.layer": 5.0}, costs, weight_budget=4, activation_budget=4)
    assert got == allocate_bits(scores, costs, weight_budget=4, activation_budget=4)


def test_deterministic():
    costs = swin_costs()
    scores = dirichlet_scores(costs, 1)
    runs = [allocate_bits(scores, costs, weight_budget=4.3, activation_budget=4.6, couple=c) for c in (1, 1, 0, 0)]
    assert runs[0] == runs[1] and runs[2] == runs[3]


# ----------------------------------------------------------------------------------------------------------------
# total scores (LRP relevance): error c·4^-b, bits follow relevance per unit of budget
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("couple", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_scores_equal_per_element_scores_divided_by_the_budget_share(seed, couple):
    costs = swin_costs()
    scores = dirichlet_scores(costs, seed)
    n, m = sum(c.num_weights for c in costs), sum(c.num_macs for c in costs)
    if couple:
        share = {c.name: Fraction(c.num_weights, n) / 2 + Fraction(c.num_macs, m) / 2 for c in costs}
        per_element = {k: float(Fraction(v) / share[k]) for k, v in scores.items()}
        expected = allocate_bits(per_element, costs, weight_budget=4, activation_budget=4.5, couple=True)
    else:  # each half is its own knapsack with its own share
        w_scores = {c.name: float(Fraction(scores[c.name]) / Fraction(c.num_weights, n)) for c in costs}
        a_scores = {c.name: float(Fraction(scores[c.name]) / Fraction(c.num_macs, m)) for c in costs}
        w = allocate_bits(w_scores, costs, weight_budget=4, activation_budget=4.5, couple=False)
        a = allocate_bits(a_scores, costs, weight_budget=4, activation_budget=4.5, couple=False)
        expected = {name: (w[name][0], a[name][1]) for name in w}
    got = allocate_bits(scores, costs, weight_budget=4, activation_budget=4.5, couple=couple, scores_are_totals=True)
    assert got == expected
    assert within_budget(got, costs, 4, 4.5)


def test_total_scores_give_a_small_layer_with_the_same_relevance_more_bits():
    # Same relevance, 1/16 of the size: a bit there costs 1/16 as much.
    costs = [LayerCost(f"big{i}", 16000, 160000) for i in range(4)] + [LayerCost(f"small{i}", 1000, 10000)
                                                                       for i in range(4)]
    scores = {c.name: 1.0 for c in costs}
    per_element = allocate_bits(scores, costs, weight_budget=4, activation_budget=4)
    assert per_element == uniform_bits(costs, 4, 4)
    totals = allocate_bits(scores, costs, weight_budget=4, activation_budget=4, scores_are_totals=True)
    assert min(totals[f"small{i}"][0] for i in range(4)) > max(totals[f"big{i}"][0] for i in range(4))
    assert within_budget(totals, costs, 4, 4)


def test_total_scores_proportional_to_size_give_uniform():
    costs = vit_costs()
    n, m = sum(c.num_weights for c in costs), sum(c.num_macs for c in costs)
    scores = {c.name: c.num_weights / n + c.num_macs / m for c in costs}
    got = allocate_bits(scores, costs, weight_budget=4, activation_budget=4, scores_are_totals=True)
    assert got == uniform_bits(costs, 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# degenerate cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("couple", [True, False])
@pytest.mark.parametrize("budget", [3, 4, 5, 6, 8])
def test_equal_scores_and_candidate_budget_give_uniform(budget, couple):
    for costs in (vit_costs(), swin_costs()):
        scores = {c.name: 0.25 for c in costs}
        result = allocate_bits(scores, costs, weight_budget=budget, activation_budget=budget, couple=couple)
        assert result == uniform_bits(costs, budget, budget)


def test_all_zero_scores_are_treated_as_equal():
    costs = vit_costs(blocks=3)
    result = allocate_bits({c.name: 0.0 for c in costs}, costs, weight_budget=5, activation_budget=5)
    assert result == uniform_bits(costs, 5, 5)


def test_single_layer():
    costs = [LayerCost("only", 100, 1000)]
    assert allocate_bits({"only": 3.0}, costs, weight_budget=5.5, activation_budget=7.9) == {"only": (5, 5)}
    assert allocate_bits({"only": 3.0}, costs, weight_budget=5.5, activation_budget=7.9, couple=False) == {
        "only": (5, 6)
    }


@pytest.mark.parametrize("couple", [True, False])
def test_budget_equal_to_smallest_candidate(couple):
    costs = swin_costs()
    result = allocate_bits(dirichlet_scores(costs, 0), costs, weight_budget=3, activation_budget=3, couple=couple)
    assert set(result.values()) == {(3, 3)}


def test_budget_above_largest_candidate_gives_largest():
    costs = vit_costs(blocks=2)
    result = allocate_bits(dirichlet_scores(costs, 0), costs, weight_budget=8.5, activation_budget=9)
    assert set(result.values()) == {(8, 8)}


# ----------------------------------------------------------------------------------------------------------------
# coupling, sensitivity, fixed layers
# ----------------------------------------------------------------------------------------------------------------


def test_coupled_vs_decoupled():
    costs = swin_costs()
    scores = dirichlet_scores(costs, 2)
    coupled = allocate_bits(scores, costs, weight_budget=6, activation_budget=4)
    assert all(w == a for w, a in coupled.values())
    assert average_bits(coupled, costs)[1] <= 4
    free = allocate_bits(scores, costs, weight_budget=6, activation_budget=4, couple=False)
    w_avg, a_avg = average_bits(free, costs)
    assert 5.9 < w_avg <= 6 and 3.9 < a_avg <= 4  # each side uses its own budget
    assert any(w != a for w, a in free.values())


def test_sensitivity_steers_bits():
    costs = vit_costs(blocks=2)
    scores = {c.name: 1.0 for c in costs}
    sens = {c.name: {b: 0.0 for b in BITS} for c in costs}
    sens["1.fc2"] = {3: 5.0, 4: 2.0, 5: 0.5, 6: 0.1, 8: 0.0}  # this layer hurts a lot when quantized hard
    plain = allocate_bits(scores, costs, weight_budget=4, activation_budget=4)
    steered = allocate_bits(scores, costs, weight_budget=4, activation_budget=4, sensitivity=sens)
    assert plain["1.fc2"] == (4, 4) and steered["1.fc2"][0] > 4
    zero_weight = allocate_bits(
        scores, costs, weight_budget=4, activation_budget=4, sensitivity=sens, sensitivity_weight=0.0
    )
    assert zero_weight == plain


def test_fixed_layers_are_pinned_and_counted():
    costs = vit_costs(blocks=4)
    scores = dirichlet_scores(costs, 4)
    del scores["patch"]  # pinned layers need no score
    fixed = {"patch": (8, 8), "head": (8, 6)}
    result = allocate_bits(scores, costs, weight_budget=4, activation_budget=4, fixed=fixed)
    assert result["patch"] == (8, 8) and result["head"] == (8, 6)
    assert within_budget(result, costs, 4, 4)
    free = allocate_bits(scores | {"patch": 1.0}, costs, weight_budget=4, activation_budget=4)
    # the pinned 8-bit layers take budget away from the others
    others = [c for c in costs if c.name not in fixed]
    assert average_bits(result, others)[0] < average_bits(free, others)[0]


def test_all_layers_fixed():
    costs = [LayerCost("a", 10, 10), LayerCost("b", 10, 10)]
    assert allocate_bits({}, costs, weight_budget=6, activation_budget=6, fixed={"a": (4, 4), "b": (8, 8)}) == {
        "a": (4, 4),
        "b": (8, 8),
    }


# ----------------------------------------------------------------------------------------------------------------
# runtime, the work-limit fallback
# ----------------------------------------------------------------------------------------------------------------


def test_runtime_100_layers():
    """Runs the ~100-layer problems the pipeline meets (no timing assert; the duration is printed with -s)."""
    for costs in (swin_costs(), vit_costs(blocks=24, dim=1024)):
        scores = dirichlet_scores(costs, 0)
        for couple in (True, False):
            start = time.perf_counter()
            result = allocate_bits(scores, costs, weight_budget=4.5, activation_budget=4.5, couple=couple)
            print(f"{len(costs)} layers, couple={couple}: {time.perf_counter() - start:.3f} s")
            assert within_budget(result, costs, 4.5, 4.5)


def test_work_limit_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(knapsack, "QUICK_WORK", 10)
    monkeypatch.setattr(knapsack, "MAX_WORK", 10)
    costs = swin_costs()
    scores = dirichlet_scores(costs, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = allocate_bits(scores, costs, weight_budget=4.5, activation_budget=4.5)
    assert any("exact search hit its work limit" in str(w.message) for w in caught)
    assert within_budget(result, costs, 4.5, 4.5)
