"""Per-layer bit allocation under average-bit budgets (SPEC §3 step 3).

Relevance scores (LRP contributions, optionally combined with Mix-QViT style measured sensitivities) decide which
layers get more bits. The problem is a multiple-choice knapsack with one or two resource constraints::

    minimise   Σ_ℓ cost_ℓ(b_ℓ)
    subject to Σ_ℓ n_ℓ·w_ℓ ≤ weight_budget·Σ_ℓ n_ℓ          (n_ℓ = parameter count)
               Σ_ℓ m_ℓ·a_ℓ ≤ activation_budget·Σ_ℓ m_ℓ      (m_ℓ = MACs per image)
               b_ℓ ∈ candidate_bits

Objective (why not "maximise Σ score·bits"): a linear utility of bits makes the knapsack push layers to the
extreme candidates. Instead the cost is an expected quantization error: uniform quantization noise has variance
∝ 2^(−2b) = 4^(−b). How a score weights it depends on what the score measures:

* per-element scores (default, ``scores_are_totals=False``; e.g. a squared weight range): a layer's noise grows
  with its size, so the cost is weighted by the layer's share ω_ℓ of the budget::

      cost_ℓ(b) = ĉ_ℓ · ω_ℓ · 4^(−b)   [+ ĉ_ℓ · sensitivity_weight · S_ℓ(b) with a sensitivity table]

  The marginal gain of one bit per budget unit is then independent of layer size: the allocation follows the
  scores only, equal scores give the uniform allocation whenever the budget is a candidate (Jensen: 4^(−b) is
  strictly convex), and higher scores mean more bits (≈ b̄ + ½·log2 of the score ratio). Without a sensitivity
  table the optimum is monotone: of two layers with identical sizes, the one with the higher score never gets
  fewer bits (swapping their bits would strictly lower the cost).
* total scores (``scores_are_totals=True``; LRP relevance: the share of the prediction that flows through the
  tensors a layer quantizes, whatever the layer's size): quantizing them perturbs that share by a relative noise
  ~4^(−b), so ``cost_ℓ(b) = ĉ_ℓ · 4^(−b)`` while a bit still costs ω_ℓ of the budget. The optimum is
  b_ℓ ≈ const + ½·log2(ĉ_ℓ / ω_ℓ): relevance per unit of budget decides, so a small layer carrying much
  relevance (a classifier head, Swin's patch merging, a q/k/v group whose bits also set the attention operands)
  gets more bits. This is the per-element case with scores ĉ_ℓ / ω_ℓ, so all its properties carry over to
  equal relevance densities.

* ``couple=True``: a layer's weight and activation bits are equal, ω_ℓ = (n_ℓ/Σn + m_ℓ/Σm)/2, and both
  constraints apply.
* ``couple=False``: the objective separates into a weight part (ω = n/Σn) and an activation part (ω = m/Σm), each
  solved exactly as its own knapsack; a sensitivity table (measured with both at b bits) is split half/half.

Solver (exact, no scipy): all costs are exact rationals (scores, sensitivities and budgets are floats, i.e. dyadic
rationals) scaled to one integer key per (layer, candidate). The key also carries two tie-breakers of strictly lower
significance, so the optimum is unique and does not depend on the solver's path: first Σ(b_ℓ − budget)² (favours
uniform; the smaller budget when coupled), then "higher bits for earlier layers" (lexicographic in the order of
``costs``). The search is a dynamic programme over layers whose states are the exact integer resource usage
(parameters and MACs above the smallest candidate, divided by the GCDs of the layer sizes and bit steps). A state is
dropped only when it is infeasible, has the same usage as a cheaper state, is dominated (one constraint: more usage
at no lower cost), or a Lagrangian lower bound on its best completion (multipliers from the LP dual; any multipliers
≥ 0 give a valid bound) exceeds the incumbent. Incumbents come from a greedy fill plus local search and a beam
search over the same DP; layers are processed clearest-first so that the nearly tied ones, which branch, come last.
All pruning is exact integer arithmetic, so the result is provably optimal. ViT/Swin/DeiT-sized problems (≈50–100
layers, 5 candidates) take ≈0.05 s (at most ≈0.25 s seen). Adversarial inputs (exactly equal scores on layers of
unrelated sizes with a budget between candidates) are subset-sum hard: past a work limit the best allocation found
is returned with a RuntimeWarning stating its proven optimality gap.

Pure module: numpy and the standard library only.
"""

from __future__ import annotations

import math
import warnings
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
            object.__setattr__(self, field, int(value))  # numpy ints would overflow silently in the sums


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


def _build_keys(primary: list[list[Fraction]], bits: Sequence[int], target: Fraction) -> tuple[list[list[int]], int]:
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


def _usage_arrays(problem: _Knapsack) -> tuple[np.ndarray, np.ndarray]:
    # int64 unless usages are astronomically large (then exact Python ints in object arrays)
    largest = max(problem.cap_w, problem.cap_a, *(r[-1] for r in problem.dw), *(r[-1] for r in problem.da))
    dtype = object if largest > 2**60 // (len(problem.dw) + 1) else np.int64
    return np.asarray(problem.dw, dtype=dtype), np.asarray(problem.da, dtype=dtype)


def _lagrangian_start(problem: _Knapsack, lam: float, mu: float) -> np.ndarray:
    """Per-row best choice at (slightly raised) LP multipliers: close to the LP optimum and feasible."""
    dw, da = _usage_arrays(problem)
    w = dw.astype(float) / max(problem.cap_w, 1)
    a = da.astype(float) / max(problem.cap_a, 1)
    rows = np.arange(len(w))
    for factor in (1.0, 1.0001, 1.001, 1.01, 1.1, 1.5, 3.0, 10.0):
        cur = np.argmin(problem.approx + factor * (lam * w + mu * a), axis=1)
        if dw[rows, cur].sum() <= problem.cap_w and da[rows, cur].sum() <= problem.cap_a:
            return cur
    return np.zeros(len(w), dtype=np.int64)


def _improve(problem: _Knapsack, start: np.ndarray, max_rounds: int = 500) -> list[int]:
    """Heuristic incumbent from a feasible start: best-ratio upgrades, then improving one- and two-row changes.

    Floats steer, but feasibility is checked in exact integers, so the result is always feasible.
    """
    cost = problem.approx
    dw, da = _usage_arrays(problem)
    rows = np.arange(cost.shape[0])
    cur = np.array(start, dtype=np.int64)
    norm_w, norm_a = max(problem.cap_w, 1), max(problem.cap_a, 1)
    tol = 1e-12 * max(float(cost.max()), 1e-300)
    for _ in range(max_rounds):
        left_w = problem.cap_w - dw[rows, cur].sum()
        left_a = problem.cap_a - da[rows, cur].sum()
        step_w = dw - dw[rows, cur][:, None]
        step_a = da - da[rows, cur][:, None]
        delta = cost - cost[rows, cur][:, None]
        fits = (step_w <= left_w) & (step_a <= left_a)
        # 1) the upgrade saving the most error per unit of (normalised) budget
        up = fits & (delta < -tol) & ((step_w > 0) | (step_a > 0))
        if up.any():
            ratio = np.where(up, -delta / (step_w / norm_w + step_a / norm_a + 1e-300), -np.inf)
            i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            cur[i] = j
            continue
        # 2) any improving single change (frees nothing, but sensitivities need not decrease with bits)
        single = fits & (delta < -tol)
        if single.any():
            i, j = np.unravel_index(int(np.argmin(np.where(single, delta, np.inf))), delta.shape)
            cur[i] = j
            continue
        # 3) the best improving exchange between two rows (typically one up, one down)
        flat_w, flat_a, flat_d = step_w.ravel(), step_a.ravel(), delta.ravel()
        owner = np.repeat(rows, cost.shape[1])
        pair_ok = (
            (flat_w[:, None] + flat_w[None, :] <= left_w)
            & (flat_a[:, None] + flat_a[None, :] <= left_a)
            & (owner[:, None] < owner[None, :])
        )
        pair_delta = np.where(pair_ok, flat_d[:, None] + flat_d[None, :], np.inf)
        p, q = np.unravel_index(int(np.argmin(pair_delta)), pair_delta.shape)
        if not pair_delta[p, q] < -tol:
            break
        for move in (p, q):
            i, j = divmod(int(move), cost.shape[1])
            cur[i] = j
    return cur.tolist()


def _total(problem: _Knapsack, choice: Sequence[int]) -> int:
    return sum(problem.keys[i][j] for i, j in enumerate(choice))


def _feasible(problem: _Knapsack, choice: Sequence[int]) -> bool:
    # Exact check in Python ints: an incumbent must be feasible, or pruning against it would be unsound.
    return (
        sum(problem.dw[i][j] for i, j in enumerate(choice)) <= problem.cap_w
        and sum(problem.da[i][j] for i, j in enumerate(choice)) <= problem.cap_a
    )


class _SearchTooLarge(Exception):
    """The exact search would exceed its work limit."""


@dataclass
class _Bound:
    """Lagrangian lower bound in exact integer key units.

    For a state after row i with usage (w, a) and adjusted cost ``adj = cost + λ·w + μ·a``, every feasible
    completion costs at least ``adj + suffix[i + 1] − offset`` (weak duality: any λ, μ ≥ 0 is valid).
    """

    lam: int
    mu: int
    lag: list[list[int]]
    suffix: list[int]
    offset: int
    float_multipliers: tuple[float, float]


def _make_bound(problem: _Knapsack, multipliers: tuple[float, float] | None = None) -> _Bound:
    lam_f, mu_f = multipliers if multipliers is not None else _lagrange_multipliers(problem)
    # Float multipliers -> integer key units per resource unit; flooring keeps them ≥ 0, so the bound stays valid.
    lam = int(Fraction(lam_f) * problem.key_per_approx / max(problem.cap_w, 1))
    mu = int(Fraction(mu_f) * problem.key_per_approx / max(problem.cap_a, 1))
    lag = [
        [k + lam * w + mu * a for k, w, a in zip(kr, wr, ar, strict=True)]
        for kr, wr, ar in zip(problem.keys, problem.dw, problem.da, strict=True)
    ]
    suffix = [0] * (len(lag) + 1)
    for i in range(len(lag) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + min(lag[i])
    return _Bound(lam, mu, lag, suffix, lam * problem.cap_w + mu * problem.cap_a, (lam_f, mu_f))


def _dp(
    problem: _Knapsack,
    bound: _Bound,
    incumbent: int,
    beam: int | None,
    max_work: int | None,
) -> list[int] | None:
    """DP over rows; states are exact usages (w, a) holding the cheapest cost that reaches them.

    Exact when ``beam`` is None: a state is dropped only if it is infeasible, merged with an equal-usage cheaper
    one, dominated (one resource: more usage at no lower cost) or its Lagrangian lower bound exceeds ``incumbent``.
    With a ``beam`` only the most promising states are kept (a heuristic for a better incumbent). Returns the best
    allocation found, or None when every state was pruned.
    """
    # A usage pair is packed into one int (w·base + a): plain ints keep dicts fast and out of the cyclic GC.
    base = problem.cap_a + 1
    n_cols = len(problem.keys[0])
    lam, mu = bound.lam, bound.mu
    one_dim = not any(any(r) for r in problem.da)
    states: dict[int, int] = {0: 0}  # packed usage -> cost
    parents: list[dict[int, int]] = []  # packed usage -> previous packed usage · n_cols + choice
    work = 0
    for i, (dw_i, da_i, keys_i) in enumerate(zip(problem.dw, problem.da, problem.keys, strict=True)):
        limit = incumbent + bound.offset - bound.suffix[i + 1]
        steps = [
            (j, dw, da, dw * base + da, key, key + lam * dw + mu * da)
            for j, (dw, da, key) in enumerate(zip(dw_i, da_i, keys_i, strict=True))
        ]
        new: dict[int, int] = {}
        back: dict[int, int] = {}
        for packed, cost in states.items():
            w, a = divmod(packed, base)
            room_w, room_a = problem.cap_w - w, problem.cap_a - a
            adj = cost + lam * w + mu * a
            for j, dw, da, dpacked, key, lag in steps:
                if dw > room_w or da > room_a or adj + lag > limit:
                    continue
                value = cost + key
                target = packed + dpacked
                old = new.get(target)
                if old is None or value < old:
                    new[target] = value
                    back[target] = packed * n_cols + j
        work += len(states) * n_cols
        if max_work is not None and work > max_work:
            raise _SearchTooLarge
        if one_dim:
            new = _pareto_1d(new)
        if beam is not None and len(new) > beam:
            # rank by the Lagrangian-adjusted cost, i.e. by the lower bound of the best completion
            new = dict(sorted(new.items(), key=lambda it: it[1] + lam * (it[0] // base) + mu * (it[0] % base))[:beam])
        if not new:
            return None
        states = new
        parents.append(back)
    end = min(states, key=states.__getitem__)
    choice = [0] * len(parents)
    for i in range(len(parents) - 1, -1, -1):
        end, choice[i] = divmod(parents[i][end], n_cols)
    return choice


def _pareto_1d(states: dict[int, int]) -> dict[int, int]:
    # With one resource, a state using more budget at no lower cost can never complete to something better.
    kept = {}
    best = None
    for key in sorted(states):
        cost = states[key]
        if best is None or cost < best:
            kept[key] = states[key]
            best = cost
    return kept


# Work (state expansions) allowed to the exact search before giving up with the best allocation found; realistic
# ViT/Swin problems need well under 10^5, adversarial ones (many exact ties between unrelated layer sizes) are
# subset-sum hard.
_QUICK_WORK = 200_000
_MAX_WORK = 2_000_000


def _permuted(problem: _Knapsack, order: Sequence[int]) -> _Knapsack:
    return _Knapsack(
        keys=[problem.keys[i] for i in order],
        dw=[problem.dw[i] for i in order],
        da=[problem.da[i] for i in order],
        cap_w=problem.cap_w,
        cap_a=problem.cap_a,
        approx=problem.approx[list(order)],
        key_per_approx=problem.key_per_approx,
    )


def _solve(problem: _Knapsack) -> list[int]:
    """Exact minimiser (module docstring).

    Rows are processed clearest first: the keys already encode every tie-break, so the order is free, and putting
    the rows whose choice is nearly tied at the LP multipliers last keeps the state set small for most of the DP.
    """
    bound = _make_bound(problem)

    def ambiguity(i: int) -> int:
        row = sorted(bound.lag[i])
        return row[1] - row[0] if len(row) > 1 else 0

    order = sorted(range(len(problem.keys)), key=ambiguity, reverse=True)
    chosen = _solve_ordered(_permuted(problem, order), bound.float_multipliers)
    result = [0] * len(order)
    for pos, i in enumerate(order):
        result[i] = chosen[pos]
    return result


def _solve_ordered(problem: _Knapsack, multipliers: tuple[float, float]) -> list[int]:
    """Incumbents (greedy fill + local search, from zero and from the LP multipliers; beam searches), then exact DP."""
    bound = _make_bound(problem, multipliers)
    lam_f, mu_f = bound.float_multipliers
    starts = (np.zeros(len(problem.keys), dtype=np.int64), _lagrangian_start(problem, lam_f, mu_f))
    candidates = [c for c in (_improve(problem, start) for start in starts) if _feasible(problem, c)]
    best = min(candidates, key=lambda c: _total(problem, c), default=[0] * len(problem.keys))
    # A tight incumbent prunes far more, so a cheap beam search comes first; if the exact pass is still too big,
    # a wider beam improves the incumbent and the exact pass is retried with more work allowed.
    for beam, max_work in ((64, None), (None, _QUICK_WORK), (1024, None), (None, _MAX_WORK)):
        try:
            found = _dp(problem, bound, _total(problem, best), beam, max_work)
        except _SearchTooLarge:
            continue
        if found is not None and _total(problem, found) < _total(problem, best):
            best = found
        if beam is None:  # the exact pass finished: nothing better than `best` exists
            return best
    gap = _total(problem, best) - min(bound.suffix[0] - bound.offset, _total(problem, best))
    warnings.warn(
        "bit allocation: the exact search hit its work limit (many exactly tied layers of unrelated sizes); "
        "returning the best allocation found, whose objective (normalised expected error) is at most "
        f"{float(Fraction(gap, problem.key_per_approx)):.3g} above the optimum",
        RuntimeWarning,
        stacklevel=4,
    )
    return best


# --------------------------------------------------------------------------------------------------------------
# building the problems
# --------------------------------------------------------------------------------------------------------------


def _capacity(
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


def _reduce(sizes: Sequence[int], cap: int) -> tuple[list[int], int]:
    # Usage is a multiple of the GCD of the sizes, so dividing through keeps the DP exact and the state space small.
    g = math.gcd(*sizes)
    return [s // g for s in sizes], cap // g


def _knapsack(
    primary: list[list[Fraction]],
    bits: Sequence[int],
    target: Fraction,
    constraints: Sequence[tuple[Sequence[int], int]],
) -> _Knapsack:
    """Integer problem from exact primary costs and ``(sizes, capacity)`` constraints (one or two)."""
    # Usage above the smallest candidate is a multiple of the GCD of the bit steps too (e.g. 2 for {4, 6, 8}).
    step_gcd = math.gcd(*(b - bits[0] for b in bits)) or 1
    steps = [(b - bits[0]) // step_gcd for b in bits]
    binding: list[tuple[list[int], int]] = []
    for sizes, cap in constraints:
        units, cap = _reduce(sizes, cap // step_gcd)
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
            expected error is ``score·4^(−b)`` instead of ``score·share·4^(−b)`` (see the module docstring).

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
    # Totals: the error does not scale with the layer's share of the budget (the constraints still do).
    error_w = [Fraction(1)] * len(free) if scores_are_totals else w_share
    error_a = [Fraction(1)] * len(free) if scores_are_totals else a_share

    result: dict[str, tuple[int, int]] = {}
    if couple:
        shares = [(wn + am) / 2 for wn, am in zip(error_w, error_a, strict=True)]
        primary = _primary(c_hat, shares, bits, sens, Fraction(sens_weight))
        problem = _knapsack(primary, bits, min(w_budget, a_budget), [(n_free, cap_w), (m_free, cap_a)])
        chosen = _solve(problem)
        result = {name: (bits[j], bits[j]) for name, j in zip(names, chosen, strict=True)}
    else:
        half = Fraction(sens_weight) / 2  # the table was measured with weights and activations both at b bits
        primary_w = _primary(c_hat, error_w, bits, sens, half)
        primary_a = _primary(c_hat, error_a, bits, sens, half)
        chosen_w = _solve(_knapsack(primary_w, bits, w_budget, [(n_free, cap_w)]))
        chosen_a = _solve(_knapsack(primary_a, bits, a_budget, [(m_free, cap_a)]))
        result = {name: (bits[jw], bits[ja]) for name, jw, ja in zip(names, chosen_w, chosen_a, strict=True)}
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
