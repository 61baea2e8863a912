"""Query/key smoothing and key/value centering: exact changes of the attention operands before they are quantized.

Every attention score is a dot product q·k over the head's channels. Multiplying query channel c by s_c and key
channel c by 1/s_c (folded into the rows of the q and k projections, weights and bias) leaves every score, hence
the float model, unchanged. Pretrained ViTs have key channels far wider than the matching query channels (and the
other way round), and one 4-bit step per head cannot serve both; with SmoothQuant's migration rule

    s_c = (max|k_c| / max|q_c|) ** alpha      (maxima over the calibration tokens)

alpha = 1/2 gives both operands the same range per channel, alpha = 0 changes nothing. The factors are clamped to
[1/MAX_FACTOR, MAX_FACTOR] so a channel that is (nearly) zero on one side cannot blow the other up.

Centering subtracts a constant m_c from channel c of every token's key or value:

- keys: each query's scores all shift by q·m, and softmax is invariant to a shift shared by a row, so the attention
  probabilities are unchanged (also with additive masks and relative position biases, which do not depend on m);
- values: the probabilities of a row sum to one, so P(V - 1 m^T) = PV - 1 m^T, and the output projection's bias
  takes W_o m back.

Pretrained ViTs have key and value channels offset far from zero (DINOv2-S: the keys of a head span up to 19 before
and 7 after), and one step per head has to cover every channel's offset; the channel's midrange (max + min) / 2
leaves each channel symmetric around zero, which is what the shared range can use best.
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


def absmax(minimum: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
    """max |x_c| of channels with the given per-channel minimum and maximum."""
    return torch.maximum(minimum.abs(), maximum.abs())


def midrange(minimum: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
    """m_c = (max_c + min_c) / 2, the shift that centres channel c: after it |x_c - m_c| <= (max_c - min_c) / 2."""
    if minimum.shape != maximum.shape:
        raise ValueError(f"minimum and maximum differ in shape: {tuple(minimum.shape)} vs {tuple(maximum.shape)}.")
    if bool((minimum > maximum).any()):
        raise ValueError("a channel's minimum is above its maximum; the ranges were not measured together.")
    return (maximum.float() + minimum.float()) / 2
