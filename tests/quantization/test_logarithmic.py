"""Log√2 / log2 quantizer for post-softmax probabilities: levels, underflow, error bound, shift form, Δ search."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpq.quantization.logarithmic import (
    log_dequantize,
    log_dequantize_shift,
    log_fake_quantize,
    log_fake_quantize_,
    log_quantize,
    zero_code,
)
from optimum_lrpq.quantization.ranges import log2_search_scale

MODES = [True, False]  # sqrt2


def _steps(sqrt2):
    return 2 if sqrt2 else 1


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_level_round_trips(bits, sqrt2):
    scale = torch.tensor(0.7)
    # 8-bit log2 levels go down to 2**-255, beyond float32: keep the levels float32 holds as normal numbers.
    codes = torch.arange(min(1 << bits, 126 * _steps(sqrt2)), dtype=torch.float32)
    levels = log_dequantize(codes, scale, bits, sqrt2)
    torch.testing.assert_close(levels, scale * 2.0 ** (-codes / _steps(sqrt2)))
    assert torch.equal(log_quantize(levels, scale, bits, sqrt2), codes)
    assert torch.all(levels[1:] < levels[:-1])  # strictly decreasing: level 0 is the largest


@pytest.mark.parametrize("sqrt2", MODES)
def test_underflow_saturation_and_zero(sqrt2):
    bits, scale = 3, torch.tensor(0.5)
    smallest = 0.5 * 2.0 ** (-7 / _steps(sqrt2))
    x = torch.tensor([0.0, -0.1, smallest * 1e-3, 0.9, 0.5, smallest])
    codes = log_quantize(x, scale, bits, sqrt2)
    assert codes.tolist() == [zero_code(bits)] * 3 + [0, 0, 7]
    x_hat = log_dequantize(codes, scale, bits, sqrt2)
    torch.testing.assert_close(x_hat, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, smallest]))


def test_underflow_boundary_matches_repq_vit():
    # RepQ-ViT keeps an unclamped level of 2**bits - 1 and zeroes only levels >= 2**bits.
    bits, scale = 2, torch.tensor(1.0)
    x = torch.tensor([2.0 ** (-3 / 2), 2.0 ** (-4 / 2)])  # log√2 levels 3 and 4
    assert log_quantize(x, scale, bits).tolist() == [3, zero_code(bits)]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    sqrt2=st.booleans(),
    scale=st.floats(1e-3, 1.0),
    position=st.floats(0.0, 1.0),
)
def test_relative_error_bound_inside_range(bits, sqrt2, scale, position):
    # Rounding in the log domain is off by at most half a level: a factor 2**(±1 / (2k)).
    steps = _steps(sqrt2)
    # x between the smallest level and Δ, but no lower than float32's normal range (8-bit log2 reaches 2**-255).
    exponent = -position * min((1 << bits) - 1, 100 * steps) / steps
    x = torch.tensor([scale * 2.0**exponent], dtype=torch.float32)
    x_hat = log_fake_quantize(x, torch.tensor(scale), bits, sqrt2)
    ratio = (x_hat / x).item()
    bound = 2.0 ** (1 / (2 * steps))
    assert 1 / bound * (1 - 1e-5) <= ratio <= bound * (1 + 1e-5)


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_shift_form_equals_direct_form(bits, sqrt2):
    scale = torch.tensor(0.8125)
    codes = torch.arange(zero_code(bits) + 1, dtype=torch.float32)  # every level and the zero code
    torch.testing.assert_close(
        log_dequantize_shift(codes, scale, bits, sqrt2), log_dequantize(codes, scale, bits, sqrt2), rtol=1e-6, atol=0
    )


def test_shift_form_constants():
    codes = torch.tensor([0.0, 1.0, 2.0, 3.0])
    expected = [1.0, 2**-1 * math.sqrt(2), 2**-1, 2**-2 * math.sqrt(2)]
    torch.testing.assert_close(log_dequantize_shift(codes, torch.tensor(1.0), 4), torch.tensor(expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_quantize_keeps_dtype_and_shape(dtype):
    x = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1).to(dtype)
    out = log_fake_quantize(x, torch.ones(1), 4)
    assert out.dtype == dtype and out.shape == x.shape


def _brute_force_scale(x, bits, sqrt2, percentiles=(0.999, 0.9999, 0.99999)):
    flat = x.reshape(-1).float()
    best, best_error = None, math.inf
    for p in percentiles:
        delta = torch.quantile(flat, p).clamp_min(1e-8)
        error = ((log_fake_quantize(flat, delta, bits, sqrt2) - flat) ** 2).mean().item()
        if error < best_error:
            best, best_error = delta, error
    return best


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_search_scale_matches_brute_force(bits, sqrt2):
    g = torch.Generator().manual_seed(bits)
    probs = torch.softmax(3 * torch.randn(4, 3, 17, 17, generator=g), dim=-1)
    scale = log2_search_scale(probs, bits, sqrt2=sqrt2)
    assert scale.shape == ()
    assert scale.item() == _brute_force_scale(probs, bits, sqrt2).item()


def test_search_scale_candidates_and_sampling():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(4 * torch.randn(8, 50, 50, generator=g), dim=-1)
    scale = log2_search_scale(probs, 4, percentiles=(0.99,))
    assert scale.item() == torch.quantile(probs.reshape(-1), 0.99).item()
    first = log2_search_scale(probs, 4, max_samples=1000, generator=torch.Generator().manual_seed(1))
    again = log2_search_scale(probs, 4, max_samples=1000, generator=torch.Generator().manual_seed(1))
    assert first.item() == again.item()


def test_search_scale_all_zero_input_stays_positive():
    scale = log2_search_scale(torch.zeros(10, 10), 4)
    assert scale.item() > 0
    assert torch.equal(log_fake_quantize(torch.zeros(10, 10), scale, 4), torch.zeros(10, 10))


def test_search_scale_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or infinite"):
        log2_search_scale(torch.tensor([0.1, float("nan"), 0.3]), 4)
    with pytest.raises(ValueError, match=r"bits must be .*between 2 and 8.*got 1"):
        log2_search_scale(torch.rand(10), 1)


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scale", [1.0, 0.37, 1e-3])
def test_in_place_form_gives_the_same_values(bits, sqrt2, scale):
    generator = torch.Generator().manual_seed(bits)
    x = torch.softmax(4 * torch.randn(3, 5, 300, generator=generator), dim=-1)
    every_level = scale * torch.exp2(-torch.arange(zero_code(bits) + 2, dtype=torch.float32) / _steps(sqrt2))
    x[0, 0, : every_level.numel()] = every_level  # each level, the zero code's value and one below it
    x[1, 0, :6] = torch.tensor([0.0, -1e-3, math.nan, 2.0, 1e-30, math.inf])
    s = torch.tensor([scale])
    expected = log_fake_quantize(x, s, bits, sqrt2)
    result = x.clone()
    assert log_fake_quantize_(result, s, bits, sqrt2) is result
    assert torch.equal(result, expected)


def test_in_place_form_needs_float32():
    with pytest.raises(TypeError, match="float32"):
        log_fake_quantize_(torch.rand(4, dtype=torch.float64), torch.ones(1), 4)


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("bits", range(2, 7))
def test_bit_pattern_rounding_is_the_nearest_level_in_the_log_domain(bits, sqrt2):
    # Up to 6 bits the level comes from float32 bit patterns; checked against log2 in float64 on the same x / scale
    # (log√2 rounds log2 of the float32 square, so a value within a few ulps of a boundary may go either way).
    generator = torch.Generator().manual_seed(bits)
    scale = torch.tensor(0.37)
    exponents = -torch.rand(20000, generator=generator, dtype=torch.float64) * (((1 << bits) + 2) / _steps(sqrt2))
    boundaries = -(torch.arange((1 << bits) + 1, dtype=torch.float64) + 0.5) / _steps(sqrt2)  # between levels
    exponents = torch.cat([exponents, boundaries])
    x = (0.37 * torch.exp2(exponents)).float()
    ratio = (x / scale).double()
    expected = torch.round(-_steps(sqrt2) * torch.log2(ratio)).clamp(0, zero_code(bits))
    codes = log_quantize(x, scale, bits, sqrt2).double()
    near_boundary = (torch.frac(-_steps(sqrt2) * torch.log2(ratio)) - 0.5).abs() < (1e-6 if sqrt2 else 1e-12)
    assert torch.equal(codes[~near_boundary], expected[~near_boundary])
    assert (codes - expected).abs().max() <= 1
    in_place = x.clone()
    assert torch.equal(log_fake_quantize_(in_place, scale, bits, sqrt2), log_dequantize(codes, scale, bits, sqrt2))


@pytest.mark.parametrize("sqrt2", MODES)
@pytest.mark.parametrize("length", [5, 37, 1000])
def test_nan_and_negative_inputs_underflow_wherever_they_sit(length, sqrt2):
    # NaN takes another route through the bit patterns than finite values: check the vectorized body and the tail.
    x = torch.rand(length)
    x[-1], x[length // 2], x[0] = math.nan, -math.nan, -0.5
    for bits in (4, 8):
        expected = log_fake_quantize(x, torch.tensor(0.9), bits, sqrt2)
        assert expected[0] == 0 and expected[length // 2] == 0 and expected[-1] == 0
        assert torch.equal(log_fake_quantize_(x.clone(), torch.tensor(0.9), bits, sqrt2), expected)
        assert log_quantize(x, torch.tensor(0.9), bits, sqrt2)[[0, length // 2, -1]].tolist() == [zero_code(bits)] * 3
