"""Learned weight rounding (AdaRound, Nagel et al. 2020, arXiv 2004.10568): the formulas only, no state.

Each weight w on a grid (step s, zero point z) is rounded down or up, `code = floor(w / s + z) + h(v)`, where `h`
is a rectified sigmoid of a learned logit `v`: soft (in [0, 1]) while learning, hard (`v >= 0`) at the end. A
regulariser `1 - |2h - 1|^beta`, with `beta` annealed from high to low, drives every `h` to 0 or 1 so that the hard
rounding equals the soft one that was optimised.
"""

from __future__ import annotations

import math

import torch

# Stretch of the rectified sigmoid (AdaRound's zeta, gamma): h reaches exactly 0 and 1 at finite logits.
ZETA, GAMMA = 1.1, -0.1
# |v| beyond which h(v) is exactly 0 or 1 (sigmoid(v) * 1.2 - 0.1 leaves [0, 1] at |v| = ln 11 ≈ 2.4).
PINNED_LOGIT = 8.0


def rectified_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """h(v) = clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def floor_and_logits(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower code, logits v) such that `lower + h(v)` reproduces `rows / scale + zero_point` inside the grid: the
    start of learning. `scale` / `zero_point` broadcast against `rows` (one per row: [out, 1]).

    The lower code is kept in [0, qmax - 1] so that `lower + h(v)` never leaves the grid: values below the grid get
    logits that pin h at 0 (code 0), values above it logits that pin h at 1 (code qmax); neither is then learned
    (h is clamped there, so its gradient is 0) nor counted by the regulariser."""
    t = rows / scale + zero_point
    lower = torch.floor(t).clamp(0, qmax - 1)
    fraction = (t - lower).clamp(1e-4, 1 - 1e-4)  # finite logits at both ends
    logits = -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1.0)
    logits = torch.where(t < 0, -PINNED_LOGIT, torch.where(t > qmax, PINNED_LOGIT, logits))
    return lower, logits


def soft_codes(lower: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Codes while learning: lower + h(v) (in the grid by construction of `floor_and_logits`)."""
    return lower + rectified_sigmoid(logits)


def hard_codes(lower: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The final codes: the lower code, plus one where the logit is non-negative (h(v) >= 1/2)."""
    return lower + (logits >= 0).to(lower.dtype)


def rounding_regularizer(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ 1 - |2 h(v) - 1|^beta: 0 when every h is 0 or 1."""
    return (1.0 - (2.0 * rectified_sigmoid(logits) - 1.0).abs().pow(beta)).sum()


def annealed_beta(progress: float, start: float = 20.0, end: float = 2.0, warmup: float = 0.2) -> float | None:
    """AdaRound's beta at `progress` in [0, 1] of learning: None during the warm-up (no regulariser), then decaying
    from `start` to `end` (cosine)."""
    if progress < warmup:
        return None
    t = (progress - warmup) / (1.0 - warmup)
    return end + 0.5 * (start - end) * (1.0 + math.cos(t * math.pi))
