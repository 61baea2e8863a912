"""Observers: what an activation quantizer records during calibration, and the grid it derives from that.

Calibration runs in micro-batches, so an observer keeps running min/max exactly and, for the percentile/MSE
search, a bounded random sample of values (per tensor) or of token rows (per channel). The sample is drawn
with a seeded generator, so calibration is deterministic.
"""

from __future__ import annotations

import torch

from ..options import STEP_GROUP_RATIO
from ..quantization import ranges
from ..quantization.clipping import clip_activation_samples
from ..quantization.ranges import estimate_range
from ..quantization.step_groups import group_steps, zero_points_for_steps
from ..quantization.uniform import scale_zero_point_from_range

# Values kept per quantizer for the percentile search: 4 MB of float32. Enough for stable 99.999th
# percentiles (10 values beyond it) while keeping ViT-Base's ~80 quantizers well under 1 GB.
DEFAULT_MAX_SAMPLES = 1 << 20


# From this many channels on, two column reductions beat one `aminmax` over dim 0 (a 2-core AMX Xeon, torch 2.13:
# [1576, 3072] 1.4 ms against 14.6; [3125, 384] 0.26 against 1.4; but [100000, 12] 6.4 against 1.4).
WIDE_CHANNELS = 32


def channel_min_max(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (min, max) of a 2-d tensor, by the faster of torch's two ways for its width."""
    if rows.shape[1] >= WIDE_CHANNELS:
        return rows.amin(dim=0), rows.amax(dim=0)
    return torch.aminmax(rows, dim=0)


class NonFiniteActivationError(ValueError):
    pass


class ActivationObserver:
    def __init__(self, name: str, per_channel: bool, method: str, num_batches: int, seed: int,
                 max_samples: int = DEFAULT_MAX_SAMPLES, keep_samples: bool | None = None,
                 fallback_method: str | None = None, step_groups: int | None = None,
                 step_group_ratio: float = STEP_GROUP_RATIO):
        self.name = name
        self.per_channel = per_channel
        self.method = method
        # Range method of the tensor-level grid a per-channel observer falls back to with too few rows (None: `method`).
        self.fallback_method = fallback_method
        # Per-channel grids only: constrain the channel steps to this many geometric levels (None: one step each).
        self.step_groups = step_groups
        self.step_group_ratio = step_group_ratio
        # min/max needs no samples, unless the samples are clipped first (CCQ-a).
        self.keep_samples = method != "minmax" if keep_samples is None else keep_samples
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.rows = 0  # vectors observed (tokens), for per-channel statistics
        self._samples: list[torch.Tensor] = []
        self._quota = max(1, max_samples // max(1, num_batches))
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_channel:
            low, high = channel_min_max(x.reshape(-1, x.shape[-1]))
        else:
            low, high = (v.reshape(1) for v in torch.aminmax(x))
        # NaN propagates into min/max and Inf shows up there too, so this costs no extra pass over x.
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise NonFiniteActivationError(
                f"Non-finite values (NaN or Inf) reach the quantizer {self.name!r} during calibration. Check the "
                "calibration images (normalized, finite) and that the float model itself produces finite outputs."
            )
        self.rows += x.numel() // max(1, x.shape[-1]) if x.ndim else 1
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        if self.keep_samples:
            self._samples.append(self._subsample(x).cpu())

    def _check_range_only(self, what: str) -> None:
        self._check_observed()
        if self.keep_samples:
            raise RuntimeError(f"The observer of {self.name!r} kept samples, which {what} cannot follow; only min/max "
                               "observations can be corrected after the pass.")

    def shift_channels(self, shift: torch.Tensor) -> None:
        """Correct a per-channel min/max for inputs that should have been x - `shift` (one value per channel)."""
        self._check_range_only("a channel shift")
        if not self.per_channel or shift.numel() != self.low.numel():
            raise RuntimeError(f"The observer of {self.name!r} has {self.low.numel()} ranges, not one per channel of a "
                               f"shift of {shift.numel()}.")
        shift = shift.to(self.low)
        self.low, self.high = self.low - shift, self.high - shift

    def replace_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Take the min/max of the inputs this observer should have seen, computed exactly elsewhere."""
        self._check_range_only("a new range")
        if low.shape != self.low.shape or high.shape != self.high.shape:
            raise RuntimeError(f"The observer of {self.name!r} holds ranges of shape {tuple(self.low.shape)}, not "
                               f"{tuple(low.shape)}.")
        self.low, self.high = low.to(self.low), high.to(self.high)

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        # Random indices with replacement: O(quota) work instead of a permutation of the whole tensor.
        if self.per_channel:
            rows = x.reshape(-1, x.shape[-1])
            quota = max(1, self._quota // rows.shape[1])
            if rows.shape[0] <= quota:
                return rows.clone()
            return rows[torch.randint(rows.shape[0], (quota,), generator=self._generator)]
        flat = x.reshape(-1)
        if flat.numel() <= self._quota:
            return flat.clone()
        return flat[torch.randint(flat.numel(), (self._quota,), generator=self._generator)]

    def _check_observed(self) -> None:
        if self.low is None:
            raise RuntimeError(
                f"The quantizer {self.name!r} saw no data during calibration; the calibration pass did not reach it."
            )

    def samples(self) -> torch.Tensor:
        """The kept samples: [values] per tensor, [token rows, channels] per channel."""
        self._check_observed()
        if not self._samples:
            raise RuntimeError(f"The observer of {self.name!r} kept no samples; create it with keep_samples=True.")
        return torch.cat(self._samples, dim=0)

    def uniform_grid(self, bits: int, clip_percentile: float | None = None,
                     min_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as 1-D tensors: one element per tensor, or one per channel.

        `clip_percentile` (CCQ-a) clamps the samples to their tensor-level percentile range first. A per-channel
        observer that saw fewer than `min_rows` vectors gives every channel the tensor-level grid instead. With
        `step_groups`, the channel steps are then rounded up to that many levels (`quantization.step_groups`).
        """
        self._check_observed()
        if self.per_channel and self.rows < min_rows:
            return self._tensor_grid_for_channels(bits)  # one shared step: already a single group
        scale, zero_point = self._grid(bits, clip_percentile)
        if self.per_channel and self.step_groups is not None:
            scale, zero_point = self._grouped(scale, zero_point, bits, exact_low=self.method == "minmax"
                                              and clip_percentile is None)
        return scale, zero_point

    def _grouped(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                 exact_low: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps rounded up to the step groups; each channel's zero point recomputed for its new step.

        The zero point places the low end of the channel's range on the new grid (the formula of
        `scale_zero_point_from_range`). That low end is the observed minimum for a min/max grid; a searched range is
        known only through its grid, whose lowest level -zero_point * scale is the searched low end to within half a
        step. A channel whose step is already a level keeps its grid exactly.
        """
        grouped = group_steps(scale, self.step_groups, self.step_group_ratio)
        low = self.low.cpu() if exact_low else -zero_point * scale
        changed = grouped != scale
        return grouped, torch.where(changed, zero_points_for_steps(low, grouped, bits), zero_point)

    def _grid(self, bits: int, clip_percentile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "minmax" and clip_percentile is None:
            return scale_zero_point_from_range(self.low.cpu(), self.high.cpu(), bits)
        if not self._samples:
            raise RuntimeError(f"The observer of {self.name!r} kept no samples; create it with keep_samples=True.")
        data = torch.cat(self._samples, dim=0)
        if clip_percentile is not None:
            data = clip_activation_samples(data, clip_percentile)
        scale, zero_point = estimate_range(data, bits, channel_axis=1 if self.per_channel else None, method=self.method)
        return scale.reshape(-1), zero_point.reshape(-1)

    def _tensor_grid_for_channels(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.fallback_method or self.method
        if method == "minmax" or not self._samples:
            scale, zero_point = scale_zero_point_from_range(self.low.min().reshape(1).cpu(),
                                                            self.high.max().reshape(1).cpu(), bits)
        else:
            scale, zero_point = estimate_range(torch.cat(self._samples).reshape(-1), bits, channel_axis=None,
                                               method=method)
        channels = self.low.numel()
        return scale.reshape(1).expand(channels).clone(), zero_point.reshape(1).expand(channels).clone()

    def log_scale(self, bits: int, sqrt2: bool) -> torch.Tensor:
        """Δ of the log quantizer (the largest representable probability)."""
        self._check_observed()
        if self.method == "minmax":
            return self.high.cpu().clamp_min(1e-8).reshape(1)
        data = torch.cat(self._samples, dim=0)
        return ranges.log2_search_scale(data, bits, sqrt2=sqrt2).reshape(1)
