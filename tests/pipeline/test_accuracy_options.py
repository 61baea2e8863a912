"""Accuracy options: partial LayerNorm fold (`fold_strength`), GPTQ rounding (`weight_rounding`), 'mse' ranges."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, logits, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.pipeline.calibration import InputMoments
from optimum_lrpq.quantization import ranges, uniform
from optimum_lrpq.quantization.gptq import gptq_quantize, inverse_upper_cholesky, lower_triangular_inverse


def _correlated_inputs(seed=0, rows=4000, channels=48):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) / channels**0.5
    x = torch.randn(rows, channels, generator=g) @ mix + 0.3 * torch.randn(rows, channels, generator=g)
    x[:, 7] *= 25.0  # an outlier channel
    return x


def test_gptq_lowers_output_error_and_stays_on_grid():
    x = _correlated_inputs()
    w = torch.randn(24, x.shape[1], generator=torch.Generator().manual_seed(1))
    scale, zero_point = ranges.minmax_range(w, 4, channel_axis=0)
    nearest = uniform.fake_quantize(w, scale, zero_point, 4)
    gptq = gptq_quantize(w, x.T @ x / len(x), scale.reshape(-1), zero_point.reshape(-1), 4)
    assert torch.allclose(uniform.fake_quantize(gptq, scale, zero_point, 4), gptq, atol=1e-6)
    def error(q):
        return ((x @ (q - w).T) ** 2).mean()

    assert error(gptq) < 0.7 * error(nearest)


def test_gptq_handles_dead_inputs_and_checks_shapes():
    x = _correlated_inputs(seed=2, channels=16)
    x[:, 3] = 0.0  # a channel that never fires
    w = torch.randn(8, 16)
    scale, zero_point = ranges.minmax_range(w, 3, channel_axis=0)
    out = gptq_quantize(w, x.T @ x / len(x), scale.reshape(-1), zero_point.reshape(-1), 3)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, torch.eye(15), scale.reshape(-1), zero_point.reshape(-1), 3)


def testinverse_upper_cholesky_factors_the_inverse():
    x = _correlated_inputs(seed=3, channels=600)  # > the 256 leaf: the block recursion runs
    h = (x.T @ x / len(x)).double()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    upper = inverse_upper_cholesky(h.flip((0, 1))).double()  # takes H in reversed order, works in float32
    assert torch.equal(upper, upper.triu())
    inverse = torch.linalg.inv(h)
    assert ((upper.T @ upper - inverse).norm() / inverse.norm()).item() < 1e-4
    lower = torch.linalg.cholesky(h)
    torch.testing.assert_close(lower_triangular_inverse(lower), torch.linalg.inv(lower), rtol=1e-8, atol=1e-10)


def test_gptq_joint_solve_of_layers_sharing_an_input_equals_separate_solves():
    """q, k and v are rounded in one solve; rows are independent given H, widths may differ per row."""
    x = _correlated_inputs(seed=4)
    h = x.T @ x / len(x)
    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(rows, x.shape[1], generator=g) for rows in (6, 9)]
    widths = (4, 6)
    grids = [ranges.minmax_range(w, b, channel_axis=0) for w, b in zip(parts, widths)]
    separate = [gptq_quantize(w, h, s.reshape(-1), z.reshape(-1), b) for w, (s, z), b in zip(parts, grids, widths)]
    bits = torch.cat([torch.full((w.shape[0],), float(b)) for w, b in zip(parts, widths)])
    joint = gptq_quantize(torch.cat(parts), h, torch.cat([s.reshape(-1) for s, _ in grids]),
                          torch.cat([z.reshape(-1) for _, z in grids]), bits)
    torch.testing.assert_close(joint, torch.cat(separate), rtol=0, atol=1e-5)


def test_mse_range_never_worse_than_minmax():
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(3))
    w[:, 0] *= 10
    for bits in (2, 4, 8):
        def mse(s, z, bits=bits):
            return ((uniform.fake_quantize(w, s, z, bits) - w) ** 2).mean(dim=1)

        assert (mse(*ranges.mse_range(w, bits, channel_axis=0)) <= mse(*ranges.minmax_range(w, bits, channel_axis=0))
                + 1e-12).all()
    with pytest.raises(ValueError, match="factors"):
        ranges.mse_range(w, 4, channel_axis=0, factors=(1.5,))


@pytest.mark.parametrize("options", [
    {"weight_rounding": "nearest"},
    {"fold_strength": 0.5},
    {"fold_strength": [0.0, 0.5, 1.0], "weight_rounding": "gptq", "weight_range": "mse"},
    {"weight_rounding": "gptq", "reparameterize": False},
])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_pipeline_with_accuracy_options_round_trips(family, options, tmp_path):
    from transformers import AutoModelForImageClassification

    model = build(family)
    x = pixels(2, seed=4)
    reference = logits(model, x)
    LRPQuantizer(LRPQConfig(weight_bits=6, activation_bits=8, **options)).quantize_model(model, pixels(8),
                                                                                        show_progress=False)
    expected = logits(model, x)
    assert torch.isfinite(expected).all()
    assert (expected - reference).abs().max() < 0.5 * reference.abs().max() + 1e-3
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True,
                                                                   disable_mmap=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(loaded.eval(), x), expected)
    assert loaded.config.quantization_config.fold_strength == model.config.quantization_config.fold_strength


def test_new_fields_are_validated_and_round_trip():
    assert LRPQConfig().weight_rounding == "gptq"
    config = LRPQConfig(fold_strength=[0, 0.5, 1], weight_rounding="nearest", weight_range="mse")
    assert config.fold_strength == [0.0, 0.5, 1.0]
    again = LRPQConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert LRPQConfig.from_dict(LRPQConfig(fold_strength=0.25).to_dict()).fold_strength == 0.25
    for bad in (1.5, -0.1, [], [0.5, 2], "0.5", True, [None]):
        with pytest.raises(ValueError, match="fold_strength"):
            LRPQConfig(fold_strength=bad)
    with pytest.raises(ValueError, match="weight_rounding must be one of"):
        LRPQConfig(weight_rounding="adaround")
    with pytest.raises(ValueError, match="weight_range must be one of"):
        LRPQConfig(weight_range="kl")


def test_input_moments_equal_the_direct_second_moment_and_its_reparameterized_form():
    """Only the block upper triangle of Σxxᵀ is accumulated (over several batches); the result is the full moment."""
    g = torch.Generator().manual_seed(6)
    width = InputMoments.BLOCK + 100  # two column blocks, the second one partial
    batches = [torch.randn(300, width, generator=g) * torch.linspace(0.1, 3.0, width) + 0.4 for _ in range(3)]
    moments = InputMoments()
    for batch in batches:
        moments.add(batch)
    x = torch.cat(batches).double()
    torch.testing.assert_close(moments.second_moment().double(), x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    ratio, shift = torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g)
    folded = x / ratio.double() - shift.double()
    torch.testing.assert_close(moments.second_moment(ratio, shift).double(), folded.T @ folded / len(x),
                               rtol=1e-4, atol=1e-4)
    scaled = x / ratio.double()  # no shift (a layer's input step factors): the float32 path
    torch.testing.assert_close(moments.second_moment(ratio, torch.zeros(width)).double(), scaled.T @ scaled / len(x),
                               rtol=1e-5, atol=1e-5)
    shifted = x - shift.double()
    torch.testing.assert_close(moments.second_moment(None, shift).double(), shifted.T @ shifted / len(x),
                               rtol=1e-4, atol=1e-4)


def test_shifted_input_moments_equal_those_of_the_shifted_rows():
    """Calibration measures v's shift during its own pass, so o's input moments are shifted after accumulation."""
    g = torch.Generator().manual_seed(7)
    width = InputMoments.BLOCK + 40
    batches = [torch.randn(200, width, generator=g) * 0.5 + torch.linspace(-6.0, 9.0, width) for _ in range(2)]
    shift = torch.linspace(-6.0, 9.0, width) + 0.1 * torch.randn(width, generator=g)
    moments, expected = InputMoments(), InputMoments()
    for batch in batches:
        moments.add(batch)
        expected.add(batch - shift)
    moments.shift(shift)
    assert moments.count == expected.count
    torch.testing.assert_close(moments.sum, expected.sum, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(moments.second_moment(), expected.second_moment(), rtol=1e-4, atol=1e-4)
