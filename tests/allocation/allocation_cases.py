"""Shared inputs for the allocation tests: model-shaped cost tables, random scores, an exact budget check."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from optimum_lrpq.allocation import LayerCost

BITS = (3, 4, 5, 6, 8)


def vit_costs(blocks: int = 12, dim: int = 768, tokens: int = 197) -> list[LayerCost]:
    """ViT-shaped layers: patch embedding, qkv / o / fc1 / fc2 per block, classifier (CLS token only)."""
    costs = [LayerCost("patch", 3 * 16 * 16 * dim, 3 * 16 * 16 * dim * (tokens - 1))]
    for b in range(blocks):
        for name, n in (("qkv", 3 * dim * dim), ("o", dim * dim), ("fc1", 4 * dim * dim), ("fc2", 4 * dim * dim)):
            costs.append(LayerCost(f"{b}.{name}", n, n * tokens))
    costs.append(LayerCost("head", dim * 1000, dim * 1000))
    return costs


def swin_costs() -> list[LayerCost]:
    """Swin-T-shaped layers: four stages with different widths and token counts, patch merging in between."""
    costs = [LayerCost("patch", 3 * 16 * 96, 3 * 16 * 96 * 3136)]
    dims, depths, tokens = (96, 192, 384, 768), (2, 2, 18, 2), (3136, 784, 196, 49)
    for s, (d, depth, t) in enumerate(zip(dims, depths, tokens, strict=True)):
        for b in range(depth):
            for name, n in (("qkv", 3 * d * d), ("o", d * d), ("fc1", 4 * d * d), ("fc2", 4 * d * d)):
                costs.append(LayerCost(f"{s}.{b}.{name}", n, n * t))
        if s < 3:
            costs.append(LayerCost(f"{s}.merge", 8 * d * d, 8 * d * d * tokens[s + 1]))
    costs.append(LayerCost("head", 768 * 1000, 768 * 1000))
    return costs


def dirichlet_scores(costs: list[LayerCost], seed: int) -> dict[str, float]:
    values = np.random.default_rng(seed).dirichlet(np.full(len(costs), 0.5))
    return {c.name: float(v) for c, v in zip(costs, values, strict=True)}


def within_budget(result, costs, weight_budget, activation_budget) -> bool:
    """Exact rational check of both constraints."""
    n = sum(c.num_weights * result[c.name][0] for c in costs)
    m = sum(c.num_macs * result[c.name][1] for c in costs)
    return n <= Fraction(weight_budget) * sum(c.num_weights for c in costs) and m <= Fraction(activation_budget) * sum(
        c.num_macs for c in costs
    )
