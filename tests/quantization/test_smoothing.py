"""Query/key smoothing factors: the pure math."""

from __future__ import annotations

import pytest
import torch

from optimum_lrpq.quantization.smoothing import MAX_FACTOR, absmax, midrange, query_key_factors


def test_half_migration_gives_queries_and_keys_the_same_range():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(50, 16, generator=g) * 3, torch.randn(50, 16, generator=g) * torch.linspace(0.1, 20, 16)
    s = query_key_factors(q.abs().amax(0), k.abs().amax(0), 0.5)
    torch.testing.assert_close((q * s).abs().amax(0), (k / s).abs().amax(0))
    torch.testing.assert_close((q * s) @ (k / s).T, q @ k.T, rtol=1e-5, atol=1e-4)  # every score unchanged


def test_no_migration_and_clamped_factors():
    q, k = torch.tensor([1.0, 0.0, 1e-9, 4.0]), torch.tensor([4.0, 1.0, 1.0, 0.0])
    assert torch.equal(query_key_factors(q, k, 0.0), torch.ones(4))
    s = query_key_factors(q, k, 1.0)
    assert s[0] == 4.0 and s[1] == MAX_FACTOR and s[2] == MAX_FACTOR and s[3] == 1 / MAX_FACTOR
    assert bool(torch.isfinite(s).all())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"query and key ranges differ in shape: \(3,\) vs \(4,\)"):
        query_key_factors(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        query_key_factors(torch.ones(3), torch.ones(3), 1.5)


def test_midrange_centres_every_channel_and_absmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * torch.linspace(0.5, 4, 8) + torch.linspace(-10, 10, 8)
    low, high = x.amin(0), x.amax(0)
    m = midrange(low, high)
    torch.testing.assert_close((x - m).amax(0), -(x - m).amin(0))
    torch.testing.assert_close((x - m).abs().amax(0), (high - low) / 2)
    assert torch.equal(absmax(low, high), x.abs().amax(0))


def test_midrange_bad_input_is_named():
    with pytest.raises(ValueError, match=r"minimum and maximum differ in shape: \(3,\) vs \(4,\)"):
        midrange(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="a channel's minimum is above its maximum"):
        midrange(torch.ones(2), torch.zeros(2))
