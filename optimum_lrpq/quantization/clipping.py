"""Clipped channel-wise quantization (CCQ) of post-LayerNorm activations: two readings of LRP-QViT's rule.

The paper's exact rule is not published (LRP-QViT, arXiv 2401.11243). Post-LayerNorm activations of
ViTs have a few channels with ranges far wider than the rest; after the reparameterization those channels
multiply the next linear's weight columns by r_c = s_c / s̃ and blow up its per-row weight ranges. Both readings
bound that spread:

- CCQ-a (`clip_activation_samples`): clamp the whole post-LN tensor to a tensor-level percentile range before
  the per-channel range search, so no channel's range can exceed the tensor's p-th percentile.
- CCQ-b (`clip_channel_scales`): clamp each channel's step s_c to [m/κ, m·κ] around the median step m, keeping
  each channel's zero point (so 0 stays exactly representable and the range shrinks around it).
"""

from __future__ import annotations

import torch

from .ranges import row_quantiles


def clip_activation_samples(samples: torch.Tensor, percentile: float) -> torch.Tensor:
    """CCQ-a: clamp [tokens, channels] samples to the tensor-level [1 − p, p] quantile range."""
    if not 0.5 < percentile <= 1.0:
        raise ValueError(f"The CCQ-a percentile must be in (0.5, 1], got {percentile}.")
    low, high = row_quantiles(samples.reshape(1, -1).float(), (1.0 - percentile, percentile))[:, 0]
    return samples.clamp(low.item(), high.item())


def clip_channel_scales(scale: torch.Tensor, ratio: float) -> torch.Tensor:
    """CCQ-b: clamp per-channel steps to [median/ratio, median·ratio]."""
    if ratio < 1.0:
        raise ValueError(f"The CCQ-b ratio must be >= 1, got {ratio}.")
    median = scale.median()
    return scale.clamp(median / ratio, median * ratio)
