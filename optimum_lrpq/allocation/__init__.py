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

Layout (one concern per module):

* :mod:`.problem`: :class:`LayerCost`, input validation, budget headroom and :func:`average_bits`;
* :mod:`.knapsack`: the exact multiple-choice knapsack solver (incumbents, Lagrangian bounds, dynamic programme);
* :mod:`.optimal`: :func:`allocate_bits`, the objective above built exactly and solved;
* :mod:`.baselines`: :func:`uniform_bits` and :func:`random_bits`.

The solver is exact: all costs are exact rationals scaled to one integer key per (layer, candidate), with two
tie-breakers of strictly lower significance, so the optimum is unique and does not depend on the solver's path:
first Σ(b_ℓ − budget)² (favours uniform; the smaller budget when coupled), then "higher bits for earlier layers"
(lexicographic in the order of ``costs``). See :mod:`.knapsack` for the search and its work limit.

Pure package: numpy, the standard library and :mod:`optimum_lrpq.options` only.
"""

from __future__ import annotations

from .baselines import random_bits, uniform_bits
from .optimal import allocate_bits
from .problem import Allocation, LayerCost, average_bits

__all__ = ["Allocation", "LayerCost", "allocate_bits", "average_bits", "random_bits", "uniform_bits"]
