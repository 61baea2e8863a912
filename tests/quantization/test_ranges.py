"""Range estimation: the uniform grid's error bound, exact quantiles and RepQ-ViT's percentile/MSE search."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpq.quantization import ranges, uniform
from optimum_lrpq.quantization.ranges import estimate_range, minmax_range, row_quantiles, search_range

PERCENTILES = (0.999, 0.9999, 0.99999)


# --- the uniform grid -------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(2, 8),
    low=st.floats(-100, 0),
    width=st.floats(1e-3, 200),
    position=st.floats(0, 1),
)
def test_round_trip_error_at_most_half_a_step_inside_the_range(bits, low, width, position):
    scale, zero_point = uniform.scale_zero_point_from_range(torch.tensor(low), torch.tensor(low + width), bits)
    # The representable interval: codes 0 .. 2**bits - 1 around the (rounded) zero point.
    lowest = ((0 - zero_point) * scale).item()
    highest = ((uniform.qmax(bits) - zero_point) * scale).item()
    x = torch.tensor([lowest + position * (highest - lowest)], dtype=torch.float32)
    error = (uniform.fake_quantize(x, scale, zero_point, bits) - x).abs().item()
    assert error <= scale.item() / 2 * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_search_range_error_bound_on_its_own_range(bits):
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(bits))
    scale, zero_point = search_range(x, bits, channel_axis=1)
    inside = (x >= (0 - zero_point) * scale) & (x <= (uniform.qmax(bits) - zero_point) * scale)
    error = (uniform.fake_quantize(x, scale, zero_point, bits) - x).abs()
    assert torch.all(error[inside] <= (scale / 2 * (1 + 1e-4)).expand_as(x)[inside])


# --- quantiles --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 4),
    length=st.integers(1, 400),
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_quantiles_match_torch_quantile(channels, length, qs, ties, seed):
    rows = torch.randn(channels, length, generator=torch.Generator().manual_seed(seed))
    if ties:
        rows = rows.mul(2).round()
    qs = qs + [1 - p for p in PERCENTILES] + list(PERCENTILES)
    expected = torch.quantile(rows, torch.tensor(qs), dim=1)
    assert torch.equal(row_quantiles(rows, qs), expected)


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 3),
    length=st.integers(1, 3000),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    tight=st.booleans(),
)
def test_prefiltered_tails_are_exact(channels, length, ties, seed, tight):
    # Force the threshold pre-filter (normally for rows >= 2**20) onto small rows with a small sample. `tight` makes
    # its threshold guess too aggressive, so that the count check fails and the fall-back branch runs too.
    rows = torch.randn(channels, length, generator=torch.Generator().manual_seed(seed))
    if ties:
        rows = rows.mul(2).round()
    qs = [1 - p for p in PERCENTILES] + list(PERCENTILES) + [0.99, 0.01]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranges, "_PREFILTER_MIN_LENGTH", 1)
        patch.setattr(ranges, "_PREFILTER_SAMPLE", 256)
        if tight:
            patch.setattr(ranges, "_PREFILTER_SLACK", 0.5)
            patch.setattr(ranges, "_PREFILTER_MARGIN", 0)
        got = row_quantiles(rows, qs)
    assert torch.equal(got, torch.quantile(rows, torch.tensor(qs), dim=1))


def test_row_quantiles_long_rows_match_torch_quantile():
    # Long enough for the real threshold pre-filter, still within torch.quantile's limit; row 1 is full of ties.
    rows = torch.randn(2, (1 << 20) + 3, generator=torch.Generator().manual_seed(0))
    rows[1] = rows[1].mul(3).round()
    qs = [0.5, 1e-5, 1e-3, 0.999, 0.99999, 1.0, 0.0]
    expected = torch.quantile(rows, torch.tensor(qs), dim=1)
    assert torch.equal(row_quantiles(rows, qs), expected)
    assert torch.equal(row_quantiles(rows[:1], qs), expected[:, :1])


def test_row_quantiles_beyond_torch_quantile_limit():
    # 1000 values, each repeated 16800 times: 16.8 M > 2**24 elements whose sorted order is known in closed form.
    repeats = 16_800
    length = 1000 * repeats
    assert length > 2**24
    data = (torch.arange(length, dtype=torch.int32) * 7 % 1000).float()[None]
    qs = [1e-5, 1e-3, 0.999, 0.9999, 0.99999]
    expected = []
    for q in qs:
        rank = q * (length - 1)
        below, above = math.floor(rank), math.ceil(rank)
        expected.append((below // repeats) + (rank - below) * ((above // repeats) - (below // repeats)))
    torch.testing.assert_close(row_quantiles(data, qs)[:, 0], torch.tensor(expected), rtol=0, atol=1e-4)


# --- search_range -----------------------------------------------------------------------------------------------


def _brute_force(x, bits, channel_axis, percentiles=PERCENTILES):
    """Per channel, per percentile: torch.quantile, the grid, fake quantization, MSE; keep the first best."""
    rows = x.float().reshape(1, -1) if channel_axis is None else x.float().movedim(channel_axis, 0).flatten(1)
    scales, zero_points = [], []
    for row in rows:
        best = None
        for p in percentiles:
            low, high = torch.quantile(row, 1 - p), torch.quantile(row, p)
            scale, zero_point = uniform.scale_zero_point_from_range(low, high, bits)
            error = ((uniform.fake_quantize(row, scale, zero_point, bits) - row) ** 2).mean()
            if best is None or error < best[0]:
                best = (error, scale, zero_point)
        scales.append(best[1])
        zero_points.append(best[2])
    return torch.stack(scales), torch.stack(zero_points)


CASES = [
    ((200,), None),
    ((8, 25, 12), None),
    ((8, 25, 12), -1),
    ((8, 25, 12), 2),
    ((8, 25, 12), 1),
    ((16, 40), 0),
    ((6, 3, 3, 3), 0),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("shape", "channel_axis"), CASES)
def test_search_range_equals_brute_force(shape, channel_axis, bits):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    scale, zero_point = search_range(x, bits, channel_axis=channel_axis)
    ref_scale, ref_zero_point = _brute_force(x, bits, channel_axis)
    assert torch.equal(scale.reshape(-1), ref_scale)
    assert torch.equal(zero_point.reshape(-1), ref_zero_point)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    channels=st.integers(1, 5),
    length=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    outlier=st.floats(-1e3, 1e3),
)
def test_search_range_equals_brute_force_property(bits, channels, length, seed, outlier):
    x = torch.randn(length, channels, generator=torch.Generator().manual_seed(seed))
    x[0, 0] = outlier
    scale, zero_point = search_range(x, bits, channel_axis=1)
    ref_scale, ref_zero_point = _brute_force(x, bits, 1)
    assert torch.equal(scale.reshape(-1), ref_scale)
    assert torch.equal(zero_point.reshape(-1), ref_zero_point)


@pytest.mark.parametrize(("shape", "channel_axis"), CASES)
def test_shapes_match_minmax_range(shape, channel_axis):
    x = torch.randn(shape)
    for got, want in zip(search_range(x, 4, channel_axis), minmax_range(x, 4, channel_axis)):
        assert got.shape == want.shape and got.dtype == want.dtype == torch.float32


def test_per_channel_independence():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    scale, zero_point = search_range(x, 4, channel_axis=-1)
    changed = x.clone()
    changed[:, 3] = changed[:, 3] * 50 + 7
    new_scale, new_zero_point = search_range(changed, 4, channel_axis=-1)
    others = [c for c in range(10) if c != 3]
    assert torch.equal(new_scale[0, others], scale[0, others])
    assert torch.equal(new_zero_point[0, others], zero_point[0, others])
    assert new_scale[0, 3] != scale[0, 3]


def _mse(x, grid, bits):
    return ((uniform.fake_quantize(x, *grid, bits) - x) ** 2).mean().item()


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("channel_axis", [None, 1])
def test_beats_minmax_with_outliers(bits, channel_axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(20_000, 4, generator=g)
    x[torch.randint(0, 20_000, (3,), generator=g)] = 40.0  # a few outliers in every channel
    searched = _mse(x, search_range(x, bits, channel_axis), bits)
    assert searched < _mse(x, minmax_range(x, bits, channel_axis), bits)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_never_worse_than_its_candidates(bits, seed):
    x = torch.randn(500, generator=torch.Generator().manual_seed(seed)) ** 3
    best = _mse(x, search_range(x, bits), bits)
    for p in PERCENTILES:
        grid = uniform.scale_zero_point_from_range(torch.quantile(x, 1 - p), torch.quantile(x, p), bits)
        assert best <= _mse(x, grid, bits)


def test_percentile_one_is_minmax():
    x = torch.randn(300, 5)
    for got, want in zip(search_range(x, 4, 1, percentiles=(1.0,)), minmax_range(x, 4, 1)):
        assert torch.equal(got, want)
    # A constant tensor gives the same grid for every candidate.
    constant = torch.full((50,), 2.0)
    for got, want in zip(search_range(constant, 4), minmax_range(constant, 4)):
        assert torch.equal(got, want)


def test_max_samples_is_reproducible_and_bounded():
    x = torch.randn(32, 1000)
    full = search_range(x, 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(search_range(x, 4, 0, max_samples=5000), full))
    first = search_range(x, 4, 0, max_samples=100, generator=torch.Generator().manual_seed(3))
    again = search_range(x, 4, 0, max_samples=100, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_larger_than_torch_quantile_limit():
    x = torch.randn(2**24 + 4096, generator=torch.Generator().manual_seed(0))
    x[:64] = 30.0
    scale, zero_point = search_range(x, 8)
    assert scale.shape == () and zero_point.shape == ()
    assert scale < minmax_range(x, 8)[0]  # the outliers were clipped


def test_bad_arguments_raise():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"bits must be .*between 2 and 8.*got 9"):
        search_range(x, 9)
    with pytest.raises(ValueError, match=r"percentiles must be .* in \[0.5, 1\]"):
        search_range(x, 4, percentiles=(0.3,))
    with pytest.raises(ValueError, match="percentiles"):
        search_range(x, 4, percentiles=())
    with pytest.raises(ValueError, match="max_samples"):
        search_range(x, 4, max_samples=0)
    with pytest.raises(ValueError, match="empty tensor"):
        search_range(torch.empty(0, 4), 4, channel_axis=1)
    with pytest.raises(ValueError, match=r"quantiles in \[0, 1\]"):
        row_quantiles(x, [1.5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        search_range(torch.tensor([1.0, float("inf"), 2.0]), 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        search_range(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), 4, channel_axis=0)


def test_estimate_range_dispatches_and_names_the_choices():
    x = torch.randn(6, 10)
    assert all(torch.equal(a, b) for a, b in zip(estimate_range(x, 4, 0, "minmax"), minmax_range(x, 4, channel_axis=0),
                                                 strict=True))
    with pytest.raises(ValueError, match=r"range method must be one of \['minmax', 'percentile_mse', 'mse'\], got 'max'"):
        estimate_range(x, 4, 0, "max")
