"""Per-layer bit allocation under average-bit budgets (SPEC §3 step 3).

Relevance scores (LRP contributions, optionally combined with Mix-QViT style measured sensitivities) decide which
layers get more bits. The problem is a multiple-choice knapsack with one or two resource constraints::

    minimise   Σ_ℓ cost_ℓ(b_ℓ)
    subject to Σ_ℓ n_ℓ·w_ℓ ≤ weight_budget·Σ_ℓ n_ℓ          (n_ℓ = parameter count)
               Σ_ℓ m_ℓ·a_ℓ ≤ activation_budget·Σ_ℓ m_ℓ      (m_ℓ = MACs per image)
               b_ℓ ∈ candidate_bits

Objective (why not "maximise Σ score·bits"): a linear utility of bits makes the knapsack push layers to the
extreme candidates. Instead the cost is an expected quantization error: uniform quantization noise has variance
∝ 2^(−2b) = 4^(−b), weighted by the layer's normalised relevance ĉ_ℓ and its share ω_ℓ of the budget::

    cost_ℓ(b) = ĉ_ℓ · ω_ℓ · 4^(−b)   [+ ĉ_ℓ · sensitivity_weight · S_ℓ(b) with a sensitivity table]

Weighting by ω_ℓ (the layer's share of the parameters / MACs) makes the marginal gain of one bit per budget unit
independent of layer size, so a layer is not favoured merely because it is cheap: the allocation follows relevance
only, equal scores give the uniform allocation whenever the budget is a candidate (Jensen: 4^(−b) is strictly
convex), and higher relevance means more bits (≈ b̄ + ½·log2 of the relevance ratio).

* ``couple=True``: a layer's weight and activation bits are equal, ω_ℓ = (n_ℓ/Σn + m_ℓ/Σm)/2, both constraints apply.
* ``couple=False``: the objective separates into a weight part (ω = n/Σn) and an activation part (ω = m/Σm), each
  solved exactly as its own knapsack; a sensitivity table (measured with both at b bits) is split half/half.

Solver (exact, documented choice): all costs are exact rationals (scores, sensitivities and budgets are floats, i.e.
dyadic rationals) scaled to one integer key per (layer, candidate). The key also carries two tie-breakers of strictly
lower significance, so the optimum is unique and does not depend on the solver's path: first the squared distance
of the bits from the budget (favours uniform), then "higher bits for earlier layers". The search is a dynamic
programme over layers whose states are the exact integer resource usage (weights and MACs, each divided by the GCD
of the layer sizes); states with equal usage are merged (keeping the cheaper), dominated states are dropped, and a
state is pruned when a Lagrangian lower bound (multipliers from the LP relaxation, any multipliers give a valid
bound) of its best completion is worse than a greedy incumbent. Every pruning rule is exact integer arithmetic, so
the result is provably optimal; on ViT/Swin-sized problems (≈50–100 layers, 5 candidates) it takes milliseconds to a
fraction of a second. Worst case (many exact ties between different-sized layers) it degrades to a pseudo-polynomial
subset-sum DP over the GCD-reduced budget.

Pure module: numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["LayerCost", "allocate_bits", "average_bits", "random_bits", "uniform_bits"]

MIN_BITS = 2
MAX_BITS = 8

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


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------


def _check_bits(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value!r}")
    return int(value)


def _check_candidates(candidate_bits: Sequence[int]) -> tuple[int, ...]:
    bits = tuple(candidate_bits)
    if not bits:
        raise ValueError("candidate_bits must not be empty")
    for b in bits:
        _check_bits(b, "candidate bits")
    return tuple(sorted({int(b) for b in bits}))


def _check_costs(costs: Sequence[LayerCost]) -> tuple[LayerCost, ...]:
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


def _check_budget(value: float, what: str) -> Fraction:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return Fraction(value)


def _check_fixed(fixed: Mapping[str, tuple[int, int]] | None, names: set[str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, pair in (fixed or {}).items():
        if name not in names:
            raise ValueError(f"fixed layer {name!r} is not in costs")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"fixed bits for layer {name!r} must be a (weight_bits, activation_bits) pair")
        out[name] = (
            _check_bits(pair[0], f"fixed weight bits of layer {name!r}"),
            _check_bits(pair[1], f"fixed activation bits of layer {name!r}"),
        )
    return out


def _normalized_scores(scores: Mapping[str, float], names: Sequence[str]) -> list[Fraction]:
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


def _sensitivity_rows(
    sensitivity: Mapping[str, Mapping[int, float]], names: Sequence[str], bits: Sequence[int]
) -> list[list[Fraction]]:
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
# the exact multiple-choice knapsack
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Knapsack:
    """Integer multiple-choice knapsack: pick one column j per row i, Σ dw ≤ cap_w, Σ da ≤ cap_a, minimise Σ key.

    ``dw``/``da`` are non-decreasing along each row and start at 0 (usage above the smallest candidate); ``approx``
    holds float versions of the primary cost, used only to steer (multipliers, incumbent), never to decide.
    """

    keys: list[list[int]]
    dw: list[list[int]]
    da: list[list[int]]
    cap_w: int
    cap_a: int
    approx: np.ndarray
    key_per_approx: int


def _shift_rows(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    # Subtracting a per-row constant does not change the argmin (exactly one choice per row) and keeps keys small.
    return [[v - min(row) for v in row] for row in rows]


def _to_int(rows: list[list[Fraction]]) -> list[list[int]]:
    denom = math.lcm(*(v.denominator for row in rows for v in row))
    return [[int(v * denom) for v in row] for row in rows]


def _build_keys(
    primary: list[list[Fraction]], bits: Sequence[int], target: Fraction
) -> tuple[list[list[int]], int]:
    """Combine primary cost and tie-breakers into one exact integer per (layer, candidate), lexicographically.

    Also returns the factor from (row-shifted) primary cost to key units, used to scale Lagrange multipliers.
    """
    n_rows, n_cols = len(primary), len(bits)
    shifted = _shift_rows(primary)
    denom = math.lcm(*(v.denominator for row in shifted for v in row))
    prim = [[int(v * denom) for v in row] for row in shifted]
    # Tie-break 1: stay close to the budget (favours the uniform allocation among equally good ones).
    second = _to_int(_shift_rows([[(Fraction(b) - target) ** 2 for b in bits] for _ in range(n_rows)]))
    # Tie-break 2: digits of a base-K number, most significant = first layer, so the complete key is unique per
    # allocation and the optimum never depends on the search order ("earlier layers get the higher bits").
    scale3 = n_cols**n_rows
    scale2 = (sum(max(row) for row in second) + 1) * scale3
    keys = []
    for i in range(n_rows):
        place = n_cols ** (n_rows - 1 - i)
        keys.append([prim[i][j] * scale2 + second[i][j] * scale3 + (n_cols - 1 - j) * place for j in range(n_cols)])
    return keys, denom * scale2


def _lagrange_multipliers(problem: _Knapsack) -> tuple[float, float]:
    """Approximately maximise the Lagrangian dual (= LP relaxation) over λ, μ ≥ 0 in normalised resource units.

    Any non-negative multipliers give a valid bound, so floats and bisection are fine here.
    """
    cost = problem.approx
    w = np.asarray(problem.dw, dtype=float) / max(problem.cap_w, 1)
    a = np.asarray(problem.da, dtype=float) / max(problem.cap_a, 1)
    rows = np.arange(cost.shape[0])

    def choice(lam: float, mu: float) -> np.ndarray:
        return np.argmin(cost + lam * w + mu * a, axis=1)

    def upper(res: np.ndarray) -> float:
        # beyond this multiplier every row picks its cheapest-resource column
        with np.errstate(divide="ignore", invalid="ignore"):
            slopes = (cost[:, :1] - cost) / res
        finite = slopes[np.isfinite(slopes)]
        return float(max(finite.max(initial=0.0), 0.0)) * 2 + 1.0

    def best_lambda(mu: float) -> float:
        lo, hi = 0.0, upper(w)
        if w[rows, choice(0.0, mu)].sum() <= 1:
            return 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if w[rows, choice(mid, mu)].sum() > 1:
                lo = mid
            else:
                hi = mid
        return hi

    if not a.any():
        return best_lambda(0.0), 0.0
    lam = best_lambda(0.0)
    if a[rows, choice(lam, 0.0)].sum() <= 1:
        return lam, 0.0
    lo, hi = 0.0, upper(a)
    for _ in range(40):
        mid = (lo + hi) / 2
        lam = best_lambda(mid)
        if a[rows, choice(lam, mid)].sum() > 1:
            lo = mid
        else:
            hi = mid
    return best_lambda(hi), hi


def _greedy(problem: _Knapsack) -> list[int]:
    """Feasible incumbent: from the cheapest allocation, repeatedly take the upgrade with the best gain per budget."""
    cost = problem.approx
    dw = np.asarray(problem.dw, dtype=np.int64)
    da = np.asarray(problem.da, dtype=np.int64)
    n_rows = cost.shape[0]
    rows = np.arange(n_rows)
    cur = np.zeros(n_rows, dtype=np.int64)
    norm_w, norm_a = max(problem.cap_w, 1), max(problem.cap_a, 1)
    while True:
        left_w = problem.cap_w - dw[rows, cur].sum()
        left_a = problem.cap_a - da[rows, cur].sum()
        step_w = dw - dw[rows, cur][:, None]
        step_a = da - da[rows, cur][:, None]
        gain = cost[rows, cur][:, None] - cost
        ok = (step_w <= left_w) & (step_a <= left_a) & (gain > 0) & ((step_w > 0) | (step_a > 0))
        if not ok.any():
            return cur.tolist()
        ratio = np.where(ok, gain / (step_w / norm_w + step_a / norm_a + 1e-300), -np.inf)
        i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        cur[i] = j


def _total(problem: _Knapsack, choice: Sequence[int]) -> int:
    return sum(problem.keys[i][j] for i, j in enumerate(choice))


def _pareto_1d(states: dict, cost_of) -> dict:
    # With one resource, a state using more budget at no lower cost can never complete to something better.
    kept = {}
    best = None
    for key in sorted(states):
        c = cost_of(key)
        if best is None or c < best:
            kept[key] = states[key]
            best = c
    return kept


def _solve(problem: _Knapsack) -> list[int]:
    """Exact minimiser (see module docstring): DP over exact resource usage, merged, dominated and bound-pruned."""
    n_rows = len(problem.keys)
    lam_f, mu_f = _lagrange_multipliers(problem)
    # Convert the float multipliers to integer key units per resource unit (flooring keeps them ≥ 0, still valid).
    scale = problem.key_per_approx
    lam = int(Fraction(lam_f) * scale / max(problem.cap_w, 1))
    mu = int(Fraction(mu_f) * scale / max(problem.cap_a, 1))

    # Lagrangian key of every choice and the suffix sums of their row minima give, for a state with usage (w, a)
    # and adjusted cost adj = cost + λw + μa, the valid lower bound adj + suffix − λ·cap_w − μ·cap_a.
    lag = [
        [k + lam * w + mu * a for k, w, a in zip(kr, wr, ar, strict=True)]
        for kr, wr, ar in zip(problem.keys, problem.dw, problem.da, strict=True)
    ]
    suffix = [0] * (n_rows + 1)
    for i in range(n_rows - 1, -1, -1):
        suffix[i] = suffix[i + 1] + min(lag[i])
    offset = lam * problem.cap_w + mu * problem.cap_a

    incumbent_choice = _greedy(problem)
    incumbent = _total(problem, incumbent_choice)
    one_dim = problem.cap_a == 0 and not any(any(r) for r in problem.da)

    states: dict[tuple[int, int], int] = {(0, 0): 0}  # usage -> adjusted cost
    parents: list[dict[tuple[int, int], tuple[tuple[int, int], int]]] = []
    for i in range(n_rows):
        limit = incumbent + offset - suffix[i + 1]
        new: dict[tuple[int, int], int] = {}
        back: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}
        dw_i, da_i, lag_i = problem.dw[i], problem.da[i], lag[i]
        for (w, a), adj in states.items():
            for j, step in enumerate(lag_i):
                nw, na = w + dw_i[j], a + da_i[j]
                if nw > problem.cap_w or na > problem.cap_a:
                    continue
                value = adj + step
                if value > limit:
                    continue
                key = (nw, na)
                old = new.get(key)
                if old is None or value < old:
                    new[key] = value
                    back[key] = ((w, a), j)
        if one_dim:
            new = _pareto_1d(new, lambda k, new=new: new[k] - lam * k[0])
            back = {k: back[k] for k in new}
        states = new
        parents.append(back)

    # The incumbent's own path always survives (its bound never exceeds its cost), so states is non-empty.
    end = min(states, key=lambda k: states[k] - lam * k[0] - mu * k[1])
    choice = [0] * n_rows
    for i in range(n_rows - 1, -1, -1):
        end, choice[i] = parents[i][end]
    return choice


# --------------------------------------------------------------------------------------------------------------
# building the problems
# --------------------------------------------------------------------------------------------------------------


def _capacity(budget: Fraction, sizes_all: Sequence[int], fixed_use: int, free_sizes: Sequence[int], bmin: int,
              what: str) -> int:
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


def _reduce(sizes: Sequence[int], cap: int) -> tuple[list[int], int]:
    # Usage is a multiple of the GCD of the sizes, so dividing through keeps the DP exact and the state space small.
    g = math.gcd(*sizes)
    return [s // g for s in sizes], cap // g


def _knapsack(primary: list[list[Fraction]], bits: Sequence[int], target: Fraction,
              constraints: Sequence[tuple[Sequence[int], int]]) -> _Knapsack:
    """Integer problem from exact primary costs and ``(sizes, capacity)`` constraints (one or two)."""
    steps = [b - bits[0] for b in bits]
    binding: list[tuple[list[int], int]] = []
    for sizes, cap in constraints:
        units, cap = _reduce(sizes, cap)
        if sum(units) * steps[-1] <= cap:
            continue  # cannot bind even with every layer at the largest candidate
        if binding and binding[0][0] == units:  # proportional sizes: keep the tighter capacity
            binding[0] = (units, min(binding[0][1], cap))
            continue
        binding.append((units, cap))
    zeros = [0] * len(primary)
    (unit_w, cap_w), (unit_a, cap_a) = (binding + [(zeros, 0), (zeros, 0)])[:2]
    keys, factor = _build_keys(primary, bits, target)
    return _Knapsack(
        keys=keys,
        dw=[[u * s for s in steps] for u in unit_w],
        da=[[u * s for s in steps] for u in unit_a],
        cap_w=cap_w,
        cap_a=cap_a,
        approx=np.array([[float(v) for v in row] for row in _shift_rows(primary)], dtype=float),
        key_per_approx=factor,
    )


def _primary(
    scores: Sequence[Fraction],
    shares: Sequence[Fraction],
    bits: Sequence[int],
    sens: list[list[Fraction]] | None,
    sens_weight: Fraction,
) -> list[list[Fraction]]:
    """ĉ_ℓ·(ω_ℓ·4^(−b) + weight·S_ℓ(b)): relevance-weighted expected quantization error (module docstring)."""
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
) -> Allocation:
    """Optimal per-layer (weight_bits, activation_bits) under parameter- and MAC-weighted average-bit budgets.

    Args:
        scores: non-negative relevance per layer (any scale; normalised internally). Layers listed in ``fixed`` need
            no score; entries for layers not in ``costs`` are ignored.
        costs: the quantizable layers, in model order (ties favour earlier layers).
        weight_budget: parameter-weighted average weight bits may not exceed this.
        activation_budget: MAC-weighted average activation bits may not exceed this.
        candidate_bits: allowed bit widths (2..8).
        couple: one bit width per layer for weights and activations (True) or independent choices (False).
        sensitivity: optional Mix-QViT table ``name -> {bits: loss increase with only that layer at bits}``; every
            candidate must be present for every free layer. Adds ``score·sensitivity_weight·S(b)`` to the cost.
        sensitivity_weight: weight of the sensitivity term relative to the relevance term.
        fixed: layers pinned to ``(weight_bits, activation_bits)``; they count towards the budgets.

    Returns:
        ``name -> (weight_bits, activation_bits)`` for every layer in ``costs``, in the order of ``costs``.

    Raises:
        ValueError: invalid candidates, scores, sensitivities or fixed bits, or a budget below the smallest
            achievable average.
    """
    costs = _check_costs(costs)
    bits = _check_candidates(candidate_bits)
    w_budget = _check_budget(weight_budget, "weight_budget")
    a_budget = _check_budget(activation_budget, "activation_budget")
    pinned = _check_fixed(fixed, {c.name for c in costs})
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
    cap_w = _capacity(w_budget, n_all, n_fixed, n_free, bits[0], "weight_budget")
    cap_a = _capacity(a_budget, m_all, m_fixed, m_free, bits[0], "activation_budget")
    if not free:
        return dict(pinned)

    c_hat = _normalized_scores(scores, names)
    sens = _sensitivity_rows(sensitivity, names, bits) if sensitivity is not None else None
    n_tot, m_tot = sum(n_all), sum(m_all)
    w_share = [Fraction(n, n_tot) for n in n_free]
    a_share = [Fraction(m, m_tot) for m in m_free]

    result: dict[str, tuple[int, int]] = {}
    if couple:
        shares = [(wn + am) / 2 for wn, am in zip(w_share, a_share, strict=True)]
        primary = _primary(c_hat, shares, bits, sens, Fraction(sens_weight))
        problem = _knapsack(primary, bits, min(w_budget, a_budget), [(n_free, cap_w), (m_free, cap_a)])
        chosen = _solve(problem)
        result = {name: (bits[j], bits[j]) for name, j in zip(names, chosen, strict=True)}
    else:
        half = Fraction(sens_weight) / 2  # the table was measured with weights and activations both at b bits
        primary_w = _primary(c_hat, w_share, bits, sens, half)
        primary_a = _primary(c_hat, a_share, bits, sens, half)
        chosen_w = _solve(_knapsack(primary_w, bits, w_budget, [(n_free, cap_w)]))
        chosen_a = _solve(_knapsack(primary_a, bits, a_budget, [(m_free, cap_a)]))
        result = {
            name: (bits[jw], bits[ja]) for name, jw, ja in zip(names, chosen_w, chosen_a, strict=True)
        }
    result.update(pinned)
    return {c.name: result[c.name] for c in costs}


# --------------------------------------------------------------------------------------------------------------
# baselines and bookkeeping
# --------------------------------------------------------------------------------------------------------------


def uniform_bits(costs: Sequence[LayerCost], weight_bits: int, activation_bits: int) -> Allocation:
    """Every layer at the same (weight_bits, activation_bits)."""
    costs = _check_costs(costs)
    pair = (_check_bits(weight_bits, "weight_bits"), _check_bits(activation_bits, "activation_bits"))
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
    costs = _check_costs(costs)
    bits = _check_candidates(candidate_bits)
    w_budget = _check_budget(weight_budget, "weight_budget")
    a_budget = _check_budget(activation_budget, "activation_budget")
    n = [c.num_weights for c in costs]
    m = [c.num_macs for c in costs]
    left_w = _capacity(w_budget, n, 0, n, bits[0], "weight_budget")
    left_a = _capacity(a_budget, m, 0, m, bits[0], "activation_budget")
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


def average_bits(allocation: Mapping[str, tuple[int, int]], costs: Sequence[LayerCost]) -> tuple[float, float]:
    """(parameter-weighted average weight bits, MAC-weighted average activation bits) of an allocation."""
    costs = _check_costs(costs)
    for c in costs:
        if c.name not in allocation:
            raise ValueError(f"allocation has no entry for layer {c.name!r}")
    n_tot = sum(c.num_weights for c in costs)
    m_tot = sum(c.num_macs for c in costs)
    w = sum(c.num_weights * allocation[c.name][0] for c in costs)
    a = sum(c.num_macs * allocation[c.name][1] for c in costs)
    return float(Fraction(w, n_tot)), float(Fraction(a, m_tot))
