"""`activation_step_groups`: the per-channel o_proj / fc2 input steps constrained to a few distinct values."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, layer_inputs, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import QuantLayerNorm, QuantLinear, UniformQuantizer
from optimum_lrpq.pipeline.calibration import MIN_ROWS_PER_CHANNEL
from optimum_lrpq.quantization.step_groups import group_steps
from optimum_lrpq.quantization.uniform import scale_zero_point_from_range

# The tiny ViT has 17 tokens per image: 64 images give 1088 rows, enough for a range per channel.
ENOUGH_IMAGES = -(-MIN_ROWS_PER_CHANNEL // 17)


@pytest.fixture(scope="module")
def calibration():
    return pixels(ENOUGH_IMAGES)


def quantize(calibration, bits=8, **options):
    config = LRPQConfig(weight_bits=bits, activation_bits=bits, mixed_precision=False,
                        num_calibration_samples=len(calibration), **options)
    return LRPQuantizer(config).quantize_model(build("vit"), calibration, show_progress=False)


def linear_inputs(model):
    return {name: m.input_quant for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.input_quant is not None}


def other_grids(model):
    """Every activation grid that is not a linear input: LayerNorm outputs and the attention operands."""
    inputs = {id(q) for q in linear_inputs(model).values()}
    return {name: (m.scale, getattr(m, "zero_point", None)) for name, m in model.named_modules()
            if isinstance(m, UniformQuantizer) and id(m) not in inputs}


def test_option_default_and_validation():
    assert LRPQConfig().activation_step_groups is None
    assert LRPQConfig(activation_step_groups=4).to_dict()["activation_step_groups"] == 4
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="activation_step_groups must be None .* or a positive integer"):
            LRPQConfig(activation_step_groups=bad)


@pytest.fixture(scope="module")
def default_model(calibration):
    return quantize(calibration)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_per_channel_inputs_take_at_most_g_steps_and_stay_close(groups, calibration, default_model):
    model = quantize(calibration, activation_step_groups=groups)
    grouped, default = linear_inputs(model), linear_inputs(default_model)
    per_channel = [name for name, quant in default.items() if quant.per_channel]
    assert {n.rsplit(".", 1)[-1] for n in per_channel} == {"o_proj", "fc2"}  # an 8-bit head input: per tensor
    for name in per_channel:
        scale = grouped[name].scale
        assert scale.unique().numel() <= groups, name
        # The steps of the default grid rounded up to the levels; never finer than calibration chose.
        assert torch.equal(scale, group_steps(default[name].scale, groups)), name
        assert bool((scale >= default[name].scale).all()), name
        codes = grouped[name].zero_point
        assert torch.equal(codes, codes.round()) and bool((codes >= 0).all() and (codes <= 255).all()), name
    # LayerNorm-output grids (reparameterized) and the per-head q/k/v grids are not grouped.
    for name, (scale, zero_point) in other_grids(default_model).items():
        other_scale, other_zero_point = other_grids(model)[name]
        assert torch.equal(other_scale, scale), name
        assert other_zero_point is None or torch.equal(other_zero_point, zero_point), name
    x = pixels(16, seed=7)
    expected, got = logits(default_model, x), logits(model, x)
    assert (got - expected).norm() / expected.norm() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_zero_points_are_recomputed_from_each_channels_range(calibration):
    # Min/max fc2 grids: zero point = round(-min(low, 0) / grouped step), the formula of scale_zero_point_from_range.
    rows = layer_inputs(build("vit"), "vit.layers.1.mlp.fc2", calibration)
    low, high = rows.amin(0), rows.amax(0)
    scale, _ = scale_zero_point_from_range(low, high, 4)
    quant = quantize(calibration, bits=4, mlp_hidden_range="minmax", activation_step_groups=1)
    quant = quant.get_submodule("vit.layers.1.mlp.fc2").input_quant
    step = torch.full_like(scale, float(scale.max()))
    torch.testing.assert_close(quant.scale, step)
    torch.testing.assert_close(quant.zero_point, torch.round(-low.clamp(max=0) / step).clamp(0, 15))


def test_searched_ranges_keep_their_low_end(calibration):
    # fc2 uses the percentile search by default: the new grid starts where the searched one did (to half a step).
    default = linear_inputs(quantize(calibration, bits=4))
    grouped = linear_inputs(quantize(calibration, bits=4, activation_step_groups=2))
    for name in ("vit.layers.0.mlp.fc2", "vit.layers.1.mlp.fc2"):
        old, new = default[name], grouped[name]
        low_old, low_new = -old.zero_point * old.scale, -new.zero_point * new.scale
        assert bool(((low_new - low_old).abs() <= new.scale / 2 + 1e-6).all()), name
        same = new.scale == old.scale
        assert torch.equal(new.zero_point[same], old.zero_point[same]), name


def test_per_tensor_inputs_and_too_few_tokens_are_unaffected(calibration):
    per_tensor = quantize(calibration, bits=4, linear_input_granularity="per_tensor", activation_step_groups=2,
                          head_input_granularity="per_tensor")
    assert all(q.scale.shape == (1,) for q in linear_inputs(per_tensor).values())
    few = pixels(4)
    shared, plain = linear_inputs(quantize(few, bits=4, activation_step_groups=2)), linear_inputs(quantize(few, bits=4))
    for name, quant in plain.items():
        assert torch.equal(shared[name].scale, quant.scale) and torch.equal(shared[name].zero_point, quant.zero_point)


def test_grouped_checkpoint_reloads_bit_identical(calibration, tmp_path):
    model = quantize(calibration, bits=6, activation_step_groups=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = pixels(4, seed=7)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.config.quantization_config.activation_step_groups == 2
    assert loaded.get_submodule("vit.layers.0.mlp.fc2").input_quant.scale.unique().numel() <= 2
    assert not any(isinstance(m, QuantLayerNorm) and m.out_quant.scale.numel() > 1 for m in loaded.modules())
