"""Query/key smoothing: an exact rescaling of the attention operands before they are quantized.

Every attention score is a dot product q·k over the head's channels. Multiplying query channel c by s_c and key
channel c by 1/s_c (folded into the rows of the q and k projections, weights and bias) leaves every score, hence
the float model, unchanged. Pretrained ViTs have key channels far wider than the matching query channels (and the
other way round), and one 4-bit step per head cannot serve both; with SmoothQuant's migration rule

    s_c = (max|k_c| / max|q_c|) ** alpha      (maxima over the calibration tokens)

alpha = 1/2 gives both operands the same range per channel, alpha = 0 changes nothing. The factors are clamped to
[1/MAX_FACTOR, MAX_FACTOR] so a channel that is (nearly) zero on one side cannot blow the other up.
"""

from __future__ import annotations

import torch

MAX_FACTOR = 100.0


def query_key_factors(query_absmax: torch.Tensor, key_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (float32, one per channel): queries are multiplied by s, keys divided by it."""
    if query_absmax.shape != key_absmax.shape:
        raise ValueError(f"query and key ranges differ in shape: {tuple(query_absmax.shape)} vs "
                         f"{tuple(key_absmax.shape)}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    tiny = torch.finfo(torch.float32).tiny
    ratio = key_absmax.float().clamp_min(tiny) / query_absmax.float().clamp_min(tiny)
    return ratio.pow(alpha).clamp(1.0 / MAX_FACTOR, MAX_FACTOR)
