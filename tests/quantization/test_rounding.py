"""AdaRound's formulas (`quantization.rounding`) and the straight-through gradients block reconstruction learns with."""

from __future__ import annotations

import math

import torch

from optimum_lrpq.quantization import logarithmic, rounding, uniform


def _grid(rows: torch.Tensor, bits: int = 4):
    low, high = rows.min(dim=1, keepdim=True).values, rows.max(dim=1, keepdim=True).values
    return uniform.scale_zero_point_from_range(low, high, bits)


def test_soft_rounding_starts_at_the_float_weight():
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    scale, zero_point = _grid(rows)
    rows[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # below and above the grid
    lower, logits = rounding.floor_and_logits(rows, scale, zero_point, 15)
    codes = rounding.soft_codes(lower, logits)
    assert codes.min() >= 0 and codes.max() <= 15
    assert codes[0, 0] == 0 and codes[0, 1] == 15  # pinned to the ends of the grid
    assert rounding.hard_codes(lower, logits)[0, 0] == 0 and rounding.hard_codes(lower, logits)[0, 1] == 15
    inside = (rows / scale + zero_point >= 0) & (rows / scale + zero_point <= 15)
    assert inside.float().mean() > 0.9
    # the fraction is clamped to [1e-4, 1 - 1e-4] so the logits stay finite: within 1e-4 of a step
    soft = (codes - zero_point) * scale
    assert torch.allclose(soft[inside], rows[inside], atol=float(scale.max()) * 2e-4)


def test_hard_rounding_from_the_start_logits_is_round_to_nearest():
    rows = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    scale, zero_point = _grid(rows, bits=3)
    lower, logits = rounding.floor_and_logits(rows, scale, zero_point, 7)
    hard = rounding.hard_codes(lower, logits)
    nearest = uniform.quantize(rows, scale, zero_point, 3)
    t = rows / scale + zero_point
    ties = (t - t.floor() - 0.5).abs() < 1e-3  # half-way values: floor + 1 vs round-half-to-even
    assert torch.equal(hard[~ties], nearest[~ties])
    assert hard.min() >= 0 and hard.max() <= 7


def test_rounding_regularizer_is_zero_only_at_hard_values():
    hard = torch.tensor([-10.0, 10.0, -3.0, 4.0])  # h(v) is exactly 0 or 1 beyond |v| ~ 2.4
    assert float(rounding.rounding_regularizer(hard, beta=2.0)) == 0.0
    assert float(rounding.rounding_regularizer(torch.zeros(3), beta=2.0)) == 3.0  # h = 1/2: 1 - 0 each


def test_annealed_beta():
    assert rounding.annealed_beta(0.1) is None  # warm-up: no regulariser
    assert math.isclose(rounding.annealed_beta(0.2), 20.0)
    assert math.isclose(rounding.annealed_beta(1.0), 2.0)
    assert 2.0 < rounding.annealed_beta(0.6) < 20.0


def test_uniform_quantization_has_the_lsq_gradients():
    x = torch.tensor([0.26, 0.74, 5.0, -5.0], requires_grad=True)  # two inside the range, one above, one below
    scale = torch.tensor(0.1, requires_grad=True)
    zero_point = torch.tensor(8.0)
    out = uniform.fake_quantize(x, scale, zero_point, 4)  # codes 0..15: range [-0.8, 0.7]
    assert torch.allclose(out, torch.tensor([0.3, 0.7, 0.7, -0.8]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # straight through inside, zero outside
    # LSQ: round(x/s) - x/s inside; the clamped code minus the zero point outside
    expected = (3 - 2.6) + (7 - 7.4) + (15 - 8) + (0 - 8)
    assert math.isclose(float(scale.grad), expected, abs_tol=1e-4)


def test_log_quantization_passes_gradients_straight_through():
    x = torch.tensor([0.9, 0.3, 0.01, 0.0], requires_grad=True)
    scale = torch.tensor([1.0])
    out = logarithmic.log_fake_quantize(x, scale, 3)
    assert torch.equal(out.detach(), logarithmic.log_fake_quantize(x.detach(), scale, 3))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_inference_values_are_unchanged_by_the_gradient_path():
    x = torch.randn(64, generator=torch.Generator().manual_seed(2))
    scale, zero_point = torch.tensor(0.05), torch.tensor(7.0)
    with torch.no_grad():
        plain = uniform.fake_quantize(x, scale, zero_point, 4)
    learned = uniform.fake_quantize(x.clone().requires_grad_(True), scale, zero_point, 4)
    assert torch.equal(plain, learned.detach())
