"""The exact integer multiple-choice knapsack behind :func:`~optimum_lrpq.allocation.allocate_bits`.

:func:`build_knapsack` turns exact (rational) per-candidate costs and one or two resource constraints into a
:class:`Knapsack`; :func:`solve_knapsack` returns its provably optimal choice per row.

Exact, no scipy: all costs are exact rationals (scores, sensitivities and budgets are floats, i.e. dyadic
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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["MAX_WORK", "QUICK_WORK", "Knapsack", "build_knapsack", "solve_knapsack"]


@dataclass
class Knapsack:
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


def _lagrange_multipliers(problem: Knapsack) -> tuple[float, float]:
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


def _usage_arrays(problem: Knapsack) -> tuple[np.ndarray, np.ndarray]:
    # int64 unless usages are astronomically large (then exact Python ints in object arrays)
    largest = max(problem.cap_w, problem.cap_a, *(r[-1] for r in problem.dw), *(r[-1] for r in problem.da))
    dtype = object if largest > 2**60 // (len(problem.dw) + 1) else np.int64
    return np.asarray(problem.dw, dtype=dtype), np.asarray(problem.da, dtype=dtype)


def _lagrangian_start(problem: Knapsack, lam: float, mu: float) -> np.ndarray:
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


def _improve(problem: Knapsack, start: np.ndarray, max_rounds: int = 500) -> list[int]:
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


def _total(problem: Knapsack, choice: Sequence[int]) -> int:
    return sum(problem.keys[i][j] for i, j in enumerate(choice))


def _feasible(problem: Knapsack, choice: Sequence[int]) -> bool:
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


def _make_bound(problem: Knapsack, multipliers: tuple[float, float] | None = None) -> _Bound:
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
    problem: Knapsack,
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
QUICK_WORK = 200_000
MAX_WORK = 2_000_000


def _permuted(problem: Knapsack, order: Sequence[int]) -> Knapsack:
    return Knapsack(
        keys=[problem.keys[i] for i in order],
        dw=[problem.dw[i] for i in order],
        da=[problem.da[i] for i in order],
        cap_w=problem.cap_w,
        cap_a=problem.cap_a,
        approx=problem.approx[list(order)],
        key_per_approx=problem.key_per_approx,
    )


def solve_knapsack(problem: Knapsack) -> list[int]:
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


def _solve_ordered(problem: Knapsack, multipliers: tuple[float, float]) -> list[int]:
    """Incumbents (greedy fill + local search, from zero and from the LP multipliers; beam searches), then exact DP."""
    bound = _make_bound(problem, multipliers)
    lam_f, mu_f = bound.float_multipliers
    starts = (np.zeros(len(problem.keys), dtype=np.int64), _lagrangian_start(problem, lam_f, mu_f))
    candidates = [c for c in (_improve(problem, start) for start in starts) if _feasible(problem, c)]
    best = min(candidates, key=lambda c: _total(problem, c), default=[0] * len(problem.keys))
    # A tight incumbent prunes far more, so a cheap beam search comes first; if the exact pass is still too big,
    # a wider beam improves the incumbent and the exact pass is retried with more work allowed.
    for beam, max_work in ((64, None), (None, QUICK_WORK), (1024, None), (None, MAX_WORK)):
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
# building the problem
# --------------------------------------------------------------------------------------------------------------


def _reduce(sizes: Sequence[int], cap: int) -> tuple[list[int], int]:
    # Usage is a multiple of the GCD of the sizes, so dividing through keeps the DP exact and the state space small.
    g = math.gcd(*sizes)
    return [s // g for s in sizes], cap // g


def build_knapsack(
    primary: list[list[Fraction]],
    bits: Sequence[int],
    target: Fraction,
    constraints: Sequence[tuple[Sequence[int], int]],
) -> Knapsack:
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
    return Knapsack(
        keys=keys,
        dw=[[u * s for s in steps] for u in unit_w],
        da=[[u * s for s in steps] for u in unit_a],
        cap_w=cap_w,
        cap_a=cap_a,
        approx=np.array([[float(v) for v in row] for row in _shift_rows(primary)], dtype=float),
        key_per_approx=factor,
    )
