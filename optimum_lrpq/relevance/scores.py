"""Per-layer contribution scores from a relevance trace (method-reference.md §4.4).

Every score is non-negative per image, normalised to sum 1 over the layers per image, then averaged over images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import RELEVANCE_SCORES as SCORES
from ..options import check_choice
from .propagation import RelevanceTrace


def _linear_abs(trace: RelevanceTrace) -> dict[str, Tensor]:
    """S-linear-abs: sum |R| at each layer's input."""
    return trace.layer_abs


def _operands(trace: RelevanceTrace) -> dict[str, Tensor]:
    """S-operands: sum |R| over every tensor quantized at the layer's bits: its input, and for q/k/v_proj also q, k,
    v and (with v) the attention probabilities, which the attention quantizes at the q/k/v bits.

    Each quantizer adds noise of relative power ~4^-b to the relevance flowing through the tensor it quantizes, so
    a layer whose bits also set the attention operands' grids carries more of the quantization noise.
    """
    return {name: trace.layer_abs[name] + trace.operand_abs[name] for name in trace.layers}


def _branch(trace: RelevanceTrace) -> dict[str, Tensor]:
    """S-branch: |sum R| entering the residual branch a layer belongs to (attention: q/k/v/o, MLP: fc1/fc2).

    Layers outside any branch (patch embedding, Swin patch merging, heads) get the net relevance |sum R| passing
    through them, the same kind of quantity.
    """
    values = {name: trace.layer_sum[name].abs() for name in trace.layers}
    for site in trace.residuals:
        for layer in site.layers:
            values[layer] = trace.branch[site.name].abs()
    return values


def _weight(trace: RelevanceTrace) -> dict[str, Tensor]:
    """S-weight: sum |R_ij| of the per-weight relevance, summed over tokens before the absolute value."""
    if trace.layer_weight is None:
        raise ValueError("This trace was computed without per-weight relevance (weight_scores=False).")
    return trace.layer_weight


SCORE_REDUCERS = {"linear_abs": _linear_abs, "operands": _operands, "branch": _branch, "weight": _weight}


def normalized_scores(per_image: dict[str, Tensor]) -> dict[str, float]:
    """Normalise each image's scores to sum 1 over the layers, then average over images (and renormalise, which
    only matters if some image had no relevance at all)."""
    names = list(per_image)
    matrix = torch.stack([per_image[n].to(torch.float64) for n in names], dim=1)  # [images, layers]
    totals = matrix.sum(1, keepdim=True)
    shares = torch.where(totals > 0, matrix / totals.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    mean = shares.mean(0)
    if mean.sum() > 0:
        mean = mean / mean.sum()
    return {name: float(value) for name, value in zip(names, mean.tolist(), strict=True)}


def layer_scores(trace: RelevanceTrace, score: str = "linear_abs") -> dict[str, float]:
    """Scores of every quantizable layer of the trace, keyed by module name."""
    check_choice(score, "score", SCORES)
    return normalized_scores(SCORE_REDUCERS[score](trace))
