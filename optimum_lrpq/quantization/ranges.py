"""Range estimation: choose (scale, zero_point) for a tensor, per tensor or per channel.

Pure functions over tensors. `channel_axis=None` means one range for the whole tensor; otherwise one
range per index along `channel_axis` (all other axes are reduced).

`search_range` and `log2_search_scale` are RepQ-ViT's 3-point percentile search chosen by MSE
(RepQ-ViT, arXiv 2212.08254). Their quantiles come from `row_quantiles`, which gives the numbers of
`torch.quantile` (default 'linear' interpolation) without its 2**24-element limit and without sorting: only the tail
elements that the percentiles need are selected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..options import RANGE_METHODS, check_bits, check_choice
from .logarithmic import log_fake_quantize
from .uniform import MIN_SCALE, channel_view_shape, qmax, scale_zero_point_from_range

DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999)

# torch.quantile refuses inputs with more elements than this.
_TORCH_QUANTILE_LIMIT = 1 << 24
# Rows at least this long have their tails pre-filtered by a threshold (see `_prefiltered_tails`): torch.topk on a
# long row runs on one thread and gets slow for k in the ten thousands (~1 s for 19.4 M elements, k = 19 k).
_PREFILTER_MIN_LENGTH = 1 << 20
_PREFILTER_SAMPLE = 1 << 16
# The pre-filter keeps about SLACK times the needed share of the sample plus MARGIN ranks, so that its count check
# nearly always passes on the first try.
_PREFILTER_SLACK = 2.0
_PREFILTER_MARGIN = 64


def _flatten_channels(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """[C, M] view with one row per channel (C = 1 for per-tensor)."""
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def minmax_range(x: torch.Tensor, bits: int, channel_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid spanning the observed min and max. Returns scale, zero_point shaped to broadcast with `x`."""
    rows = _flatten_channels(x.detach().float(), channel_axis)
    scale, zero_point = scale_zero_point_from_range(rows.amin(dim=1), rows.amax(dim=1), bits)
    return _reshape(scale, zero_point, x, channel_axis)


def _reshape(scale, zero_point, x, channel_axis):
    if channel_axis is None:
        return scale.reshape([]), zero_point.reshape([])
    shape = channel_view_shape(x.ndim, channel_axis, x.shape[channel_axis])
    return scale.reshape(shape), zero_point.reshape(shape)


def search_range(
    x: torch.Tensor,
    bits: int,
    channel_axis: int | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's range search: per candidate p, the grid on [quantile(1 - p), quantile(p)]; keep the least MSE.

    Independently per channel (vectorised over channels); ties go to the first percentile. `max_samples` caps the
    elements per channel by a random subset of positions (shared by all channels) drawn with `generator`.
    Returns scale, zero_point shaped like `minmax_range`'s.
    """
    check_bits(bits)
    percentiles = _check_percentiles(percentiles)
    rows = _subsample(_checked_rows(x, channel_axis), max_samples, generator)
    count = len(percentiles)
    bounds = row_quantiles(rows, [1.0 - p for p in percentiles] + list(percentiles))  # [2P, C]
    scales, zero_points = scale_zero_point_from_range(bounds[:count], bounds[count:], bits)  # [P, C] each
    buffer = torch.empty_like(rows)  # reused by every candidate: one extra copy of the data in all
    errors = torch.stack(
        [_uniform_row_mse(rows, scales[i, :, None], zero_points[i, :, None], bits, buffer) for i in range(count)]
    )
    _check_errors(errors, rows)
    best = errors.argmin(dim=0, keepdim=True)  # argmin returns the first minimum: ties go to the first percentile
    scale, zero_point = scales.gather(0, best)[0], zero_points.gather(0, best)[0]
    return _reshape(scale, zero_point, x, channel_axis)


DEFAULT_SHRINK_FACTORS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


def mse_range(
    x: torch.Tensor,
    bits: int,
    channel_axis: int | None = None,
    factors: Sequence[float] = DEFAULT_SHRINK_FACTORS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range shrunk towards 0 by the factor f of `factors` with the least MSE (per channel; ties: first).

    Candidate f quantizes on [f · min, f · max]; f = 1 is `minmax_range`, so the result is never worse than it in
    MSE on `x`. Meant for weight rows, where clipping the few largest values buys resolution for all the others.
    """
    check_bits(bits)
    if not factors or not all(0.0 < f <= 1.0 for f in factors):
        raise ValueError(f"factors must be a non-empty sequence of values in (0, 1], got {factors!r}.")
    rows = _checked_rows(x, channel_axis)
    low, high = rows.amin(dim=1), rows.amax(dim=1)
    buffer = torch.empty_like(rows)
    best_scale = best_zero_point = best_error = None
    for f in factors:
        scale, zero_point = scale_zero_point_from_range(low * f, high * f, bits)
        error = _uniform_row_mse(rows, scale[:, None], zero_point[:, None], bits, buffer)
        if best_error is None:
            best_scale, best_zero_point, best_error = scale, zero_point, error
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero_point = torch.where(better, zero_point, best_zero_point)
        best_error = torch.where(better, error, best_error)
    _check_errors(best_error, rows)
    return _reshape(best_scale, best_zero_point, x, channel_axis)


def log2_search_scale(
    x: torch.Tensor,
    bits: int,
    sqrt2: bool = True,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scale Δ (0-d) of the log√2 / log2 quantizer for probabilities: the quantile(x, p) with the least MSE."""
    check_bits(bits)
    percentiles = _check_percentiles(percentiles)
    flat = _subsample(_checked_rows(x, None), max_samples, generator)
    # A zero quantile (mostly-zero input) would put every value above the top level; keep Δ positive.
    deltas = row_quantiles(flat, percentiles)[:, 0].clamp_min(MIN_SCALE)
    errors = torch.stack([_log_mse(flat, delta, bits, sqrt2) for delta in deltas])
    _check_errors(errors, flat)
    return deltas[errors.argmin()]


def row_quantiles(rows: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """[len(qs), C]: torch.quantile(rows, q, dim=1) for each q, for [C, M] float rows of any length M.

    Same interpolation as torch.quantile's default ('linear'): rank r = q * (M - 1), value = lerp(sorted[floor(r)],
    sorted[ceil(r)], r - floor(r)). Only the order statistics at those ranks are computed.
    """
    length = rows.shape[1]
    if length == 0 or not qs or not all(0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"Need non-empty rows and quantiles in [0, 1]; got {length} columns and qs={list(qs)!r}.")
    # torch.quantile computes ranks in the input's dtype (float32); doing the same makes the results bit-identical.
    # Beyond its size limit float32 ranks lose integer precision, so use float64 there.
    rank_dtype = rows.dtype if length <= _TORCH_QUANTILE_LIMIT else torch.float64
    ranks = torch.tensor(list(qs), dtype=rank_dtype) * (length - 1)
    below = ranks.long()  # truncation == floor, ranks are >= 0
    above = ranks.ceil().long()
    weights = (ranks - below).to(rows.dtype).to(rows.device)
    stats = _order_statistics(rows, sorted(set(below.tolist()) | set(above.tolist())))
    low = torch.stack([stats[i] for i in below.tolist()])
    high = torch.stack([stats[i] for i in above.tolist()])
    return torch.lerp(low, high, weights[:, None])


def _order_statistics(rows: torch.Tensor, ranks: Sequence[int]) -> dict[int, torch.Tensor]:
    """{r: the r-th smallest value of each row (0-based), shape [C]} for the given ranks."""
    length = rows.shape[1]
    # Serve each rank from the nearer end; a percentile search needs only a sliver of each tail.
    bottom = [r for r in ranks if r <= length - 1 - r]
    top = [r for r in ranks if r > length - 1 - r]
    k_bottom = max(bottom) + 1 if bottom else 0
    k_top = length - min(top) if top else 0
    if 4 * (k_bottom + k_top) > length:  # central quantiles: a full sort is cheaper than two large top-k's
        ordered = rows.sort(dim=1).values
        return {r: ordered[:, r] for r in ranks}
    smallest = _extreme_values(rows, k_bottom, largest=False)  # ascending: rank r at column r
    largest = _extreme_values(rows, k_top, largest=True)  # descending: rank r at column length - 1 - r
    stats = {r: smallest[:, r] for r in bottom}
    stats.update({r: largest[:, length - 1 - r] for r in top})
    return stats


def _extreme_values(rows: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """[C, k]: the k largest (descending) or smallest (ascending) values of each row."""
    if k == 0:
        return rows.new_empty(rows.shape[0], 0)
    if rows.shape[1] >= _PREFILTER_MIN_LENGTH:
        tails = _prefiltered_tails(rows, k, largest)
        if tails is not None:
            rows = tails
    return torch.topk(rows, k, dim=1, largest=largest, sorted=True).values


def _prefiltered_tails(rows: torch.Tensor, k: int, largest: bool) -> torch.Tensor | None:
    """[C, K >= k] holding each row's k most extreme values (padded with ∓inf), or None if a guess was too tight.

    Per row, a threshold from a fixed-seed random sample of positions (so the result is deterministic) keeps a
    generous share. Exactness does not depend on the sample: when at least k values of a row are beyond its
    threshold, the row's k most extreme values are among them; otherwise we return None and the caller uses all.
    """
    channels, length = rows.shape
    needed = max(1, math.ceil(_PREFILTER_SLACK * k * _PREFILTER_SAMPLE / length) + _PREFILTER_MARGIN)
    if needed >= _PREFILTER_SAMPLE:
        return None
    generator = torch.Generator(device=rows.device).manual_seed(0)
    positions = torch.randint(length, (_PREFILTER_SAMPLE,), generator=generator, device=rows.device)
    thresholds = torch.topk(rows[:, positions], needed, dim=1, largest=largest).values[:, -1:]
    keep = rows >= thresholds if largest else rows <= thresholds
    selected = rows[keep]  # row-major: row 0's values first
    # Summing a bool mask costs ~4x the selection itself; a single row's count is just the selection's size.
    counts = keep.sum(dim=1) if channels > 1 else torch.tensor([selected.numel()], device=rows.device)
    if bool((counts < k).any()):
        return None
    # Scatter the ragged per-row selections into a padded [C, max count] block; padding never wins a top-k.
    row_ids = torch.repeat_interleave(torch.arange(channels, device=rows.device), counts)
    columns = torch.arange(selected.numel(), device=rows.device) - (counts.cumsum(0) - counts)[row_ids]
    tails = rows.new_full((channels, int(counts.max())), -math.inf if largest else math.inf)
    tails[row_ids, columns] = selected
    return tails


def _uniform_row_mse(
    rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, buffer: torch.Tensor
) -> torch.Tensor:
    """[C] mean squared error of `uniform.fake_quantize` per row, computed in place in `buffer` to save memory.

    Same operations in the same order as uniform.quantize / uniform.dequantize, so the numbers are identical.
    """
    torch.div(rows, scale, out=buffer)
    buffer.add_(zero_point).round_().clamp_(0, qmax(bits))
    buffer.sub_(zero_point).mul_(scale).sub_(rows).square_()
    return buffer.mean(dim=1)


def _log_mse(flat: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool) -> torch.Tensor:
    """0-d mean squared error of the log fake quantizer on [1, M] rows."""
    # log_fake_quantize returns a fresh float32 tensor for float32 input, so it can be reused in place.
    return log_fake_quantize(flat, scale, bits, sqrt2).sub_(flat).square_().mean()


def _checked_rows(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """Contiguous [C, M] float32 rows of `x`; ValueError for an empty tensor.

    Contiguous because top-k and the row means run ~4x faster on it than on the strided view that
    `_flatten_channels` returns for channel_axis=-1 (this is the one copy of the data made here, if any).
    """
    if x.numel() == 0:
        raise ValueError(f"Cannot estimate a range from an empty tensor of shape {tuple(x.shape)}.")
    return _flatten_channels(x.detach().float(), channel_axis).contiguous()


def _check_errors(errors: torch.Tensor, rows: torch.Tensor) -> None:
    """ValueError if the data hold NaN or inf (a NaN would poison every range).

    Checked on the candidates' errors, which are non-finite whenever the data are, so that the full pass over the
    data (~0.25 s for 19 M elements) is only paid when something is wrong.
    """
    if not bool(torch.isfinite(errors).all()) and not bool(torch.isfinite(rows).all()):
        raise ValueError("Cannot estimate a range from a tensor with NaN or infinite values.")


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    """Percentiles as floats in [0.5, 1] (p < 0.5 would swap the roles of the low and high quantile)."""
    values = tuple(float(p) for p in percentiles)
    if not values or not all(0.5 <= p <= 1.0 for p in values):
        raise ValueError(f"percentiles must be a non-empty sequence of values in [0.5, 1], got {percentiles!r}.")
    return values


def _subsample(rows: torch.Tensor, max_samples: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """At most `max_samples` columns of [C, M] rows, chosen at random without replacement (same for every row)."""
    if max_samples is None:
        return rows
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}.")
    if rows.shape[1] <= max_samples:
        return rows
    device = generator.device if generator is not None else rows.device
    keep = torch.randperm(rows.shape[1], generator=generator, device=device)[:max_samples]
    return rows[:, keep.to(rows.device)]


def estimate_range(x: torch.Tensor, bits: int, channel_axis: int | None, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for `x` by the range method named in `LRPQConfig` (`options.RANGE_METHODS`), shaped to
    broadcast against it."""
    if method == "minmax":
        return minmax_range(x, bits, channel_axis=channel_axis)
    if method == "percentile_mse":
        return search_range(x, bits, channel_axis=channel_axis)
    if method == "mse":
        return mse_range(x, bits, channel_axis=channel_axis)
    check_choice(method, "range method", RANGE_METHODS)
    raise AssertionError(f"range method {method!r} is in RANGE_METHODS but has no implementation here")
