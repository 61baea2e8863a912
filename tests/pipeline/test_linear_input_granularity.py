"""Finer activation grids: per-channel o_proj / fc2 inputs (`linear_input_granularity`) and per-head q/k/v
(`attention_granularity`): grids, checkpoints, old formats."""

from __future__ import annotations

import logging

import pytest
import torch
from local_files import as_older_format
from tiny_models import build, layer_inputs, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import PerHeadQuantizer, QuantLinear, UniformQuantizer
from optimum_lrpq.pipeline.calibration import MIN_HEAD_ROWS, MIN_ROWS_PER_CHANNEL
from optimum_lrpq.quantization.uniform import fake_quantize, scale_zero_point_from_range

# The tiny ViT has 17 tokens per image: 64 images give 1088 rows, enough for a range per channel.
ENOUGH_IMAGES = -(-MIN_ROWS_PER_CHANNEL // 17)


def quantize(calibration, **options):
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=False,
                        num_calibration_samples=len(calibration), **options)
    return LRPQuantizer(config).quantize_model(build("vit"), calibration, show_progress=False)


def input_scales(model):
    return {name: m.input_quant.scale for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.input_quant is not None}


def test_default_is_per_channel_and_old_formats_read_per_tensor():
    assert LRPQConfig().linear_input_granularity == "per_channel"
    assert LRPQConfig(format_version=1).linear_input_granularity == "per_tensor"
    assert LRPQConfig(format_version=1, linear_input_granularity="per_channel").linear_input_granularity == "per_channel"
    with pytest.raises(ValueError, match=r"linear_input_granularity must be one of \['per_tensor', 'per_channel'\]"):
        LRPQConfig(linear_input_granularity="per_row")


def test_block_linears_and_heads_get_one_step_per_channel():
    model = quantize(pixels(ENOUGH_IMAGES))
    scales = input_scales(model)
    for name in ("vit.layers.0.attention.o_proj", "vit.layers.1.mlp.fc2", "classifier"):
        scale = scales[name]
        assert scale.shape == (model.get_submodule(name).in_features,)
        assert scale.unique().numel() > 1, name  # real per-channel ranges, not one range repeated


def test_per_channel_grid_is_each_channels_float_calibration_range():
    # The observation pass runs the float function, so fc2's grid is the min/max per channel of the float model's
    # fc2 input over the calibration images.
    calibration = pixels(ENOUGH_IMAGES)
    rows = layer_inputs(build("vit"), "vit.layers.0.mlp.fc2", calibration)
    scale, zero_point = scale_zero_point_from_range(rows.amin(0), rows.amax(0), 4)
    quant = quantize(calibration, mlp_hidden_range="minmax").get_submodule("vit.layers.0.mlp.fc2").input_quant
    torch.testing.assert_close(quant.scale, scale)
    torch.testing.assert_close(quant.zero_point, zero_point)


def test_mlp_hidden_range_clips_only_the_fc2_inputs():
    assert LRPQConfig().mlp_hidden_range == "percentile_mse"
    with pytest.raises(ValueError, match=r"mlp_hidden_range must be one of \['minmax', 'percentile_mse', 'mse'\]"):
        LRPQConfig(mlp_hidden_range="p99")
    calibration = pixels(ENOUGH_IMAGES)
    clipped, minmax = input_scales(quantize(calibration)), input_scales(quantize(calibration, mlp_hidden_range="minmax"))
    for name in clipped:
        if name.endswith("mlp.fc2"):
            # A searched percentile never widens a channel's range, and clips some of them.
            assert bool((clipped[name] <= minmax[name] * (1 + 1e-6)).all()), name
            assert bool((clipped[name] < minmax[name] * 0.99).any()), name
        else:
            torch.testing.assert_close(clipped[name], minmax[name], msg=name)


def test_too_few_tokens_fall_back_to_one_shared_range(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        model = quantize(pixels(4))
    scale = input_scales(model)["vit.layers.0.mlp.fc2"]
    assert scale.shape == (64,) and scale.unique().numel() == 1
    assert "too few for a range per channel" in caplog.text and "linear_input_granularity='per_tensor'" in caplog.text
    # How many images would do: 4 images of 17 tokens give 68 rows; 1024 rows take ceil(1024 / 17) = 61 images.
    assert "saw only 68 tokens" in caplog.text
    assert "At 17 tokens per image that takes 61 calibration images instead of 4" in caplog.text
    assert "num_calibration_samples=61 (`--num-samples 61` on the command line)" in caplog.text


@pytest.mark.parametrize("images, warned", [(ENOUGH_IMAGES - 1, True), (ENOUGH_IMAGES, False)])
def test_the_suggested_number_of_images_is_exactly_enough(caplog, images, warned):
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        model = quantize(pixels(images))
    assert (f"takes {ENOUGH_IMAGES} calibration images instead of {images}" in caplog.text) == warned
    assert ("too few for a range per channel" in caplog.text) == warned
    assert (input_scales(model)["vit.layers.0.mlp.fc2"].unique().numel() == 1) == warned


def test_per_tensor_option_keeps_one_step_per_layer():
    scales = input_scales(quantize(pixels(ENOUGH_IMAGES), linear_input_granularity="per_tensor"))
    assert all(scale.shape == (1,) for name, scale in scales.items() if name != "classifier")
    assert scales["classifier"].shape == (32,)  # the heads have their own option
    scales = input_scales(quantize(pixels(ENOUGH_IMAGES), linear_input_granularity="per_tensor",
                                   head_input_granularity="per_tensor"))
    assert all(scale.shape == (1,) for scale in scales.values())


def test_per_channel_checkpoint_reloads_bit_identical(tmp_path):
    model = quantize(pixels(ENOUGH_IMAGES))
    x = pixels(4, seed=7)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.get_submodule("vit.layers.0.mlp.fc2").input_quant.scale.shape == (64,)


def test_format_1_checkpoint_without_the_field_loads_per_tensor(tmp_path):
    """Checkpoints written before the option existed (format 1) had per-tensor inputs and no field for it."""
    model = quantize(pixels(ENOUGH_IMAGES), linear_input_granularity="per_tensor", attention_granularity="per_tensor",
                     head_input_granularity="per_tensor")
    model.save_pretrained(tmp_path)
    as_older_format(tmp_path, 1, "linear_input_granularity", "attention_granularity", "head_input_granularity")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = pixels(4, seed=7)
    assert loaded.config.quantization_config.linear_input_granularity == "per_tensor"
    assert loaded.config.quantization_config.attention_granularity == "per_tensor"
    assert torch.equal(logits(loaded, x), logits(model, x))


# ---- per-channel head inputs (`head_input_granularity`)


def test_head_input_granularity_default_and_old_formats():
    assert LRPQConfig().head_input_granularity == "per_channel"
    assert LRPQConfig(format_version=3).head_input_granularity == "per_tensor"
    assert LRPQConfig(format_version=3, head_input_granularity="per_channel").head_input_granularity == "per_channel"
    with pytest.raises(ValueError, match=r"head_input_granularity must be one of \['per_tensor', 'per_channel'\]"):
        LRPQConfig(head_input_granularity="per_head")


def test_head_inputs_are_per_channel_below_8_bits_only():
    calibration = pixels(MIN_HEAD_ROWS)  # one vector per image reaches the head: exactly enough
    four = input_scales(quantize(calibration))["classifier"]
    assert four.shape == (32,) and four.unique().numel() > 1
    config = LRPQConfig(weight_bits=8, activation_bits=8, mixed_precision=False, num_calibration_samples=MIN_HEAD_ROWS)
    eight = LRPQuantizer(config).quantize_model(build("vit"), calibration, show_progress=False)
    assert eight.get_submodule("classifier").input_quant.scale.shape == (1,)


def test_deit_heads_get_their_own_per_channel_grids_and_reload_bit_identical(tmp_path):
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=False, num_calibration_samples=32)
    model = LRPQuantizer(config).quantize_model(build("deit_teacher"), pixels(32), show_progress=False)
    heads = {name: model.get_submodule(name).input_quant.scale for name in ("cls_classifier", "distillation_classifier")}
    assert all(s.shape == (32,) and s.unique().numel() > 1 for s in heads.values())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = pixels(4, seed=7)
    assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_too_few_images_for_head_ranges_fall_back_and_name_the_option(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        model = quantize(pixels(ENOUGH_IMAGES)[: MIN_HEAD_ROWS - 1], linear_input_granularity="per_tensor")
    scale = input_scales(model)["classifier"]
    assert scale.shape == (32,) and scale.unique().numel() == 1
    assert f"saw only {MIN_HEAD_ROWS - 1} tokens" in caplog.text and f"(needs {MIN_HEAD_ROWS})" in caplog.text
    assert f"takes {MIN_HEAD_ROWS} calibration images instead of {MIN_HEAD_ROWS - 1}" in caplog.text
    assert "head_input_granularity='per_tensor'" in caplog.text


def test_format_3_checkpoint_without_the_field_loads_per_tensor_heads(tmp_path):
    model = quantize(pixels(ENOUGH_IMAGES), head_input_granularity="per_tensor")
    model.save_pretrained(tmp_path)
    as_older_format(tmp_path, 3, "head_input_granularity")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.head_input_granularity == "per_tensor"
    x = pixels(4, seed=7)
    assert torch.equal(logits(loaded, x), logits(model, x))


# ---- per-head q/k/v grids (`attention_granularity`)


def test_attention_granularity_default_and_old_formats():
    assert LRPQConfig().attention_granularity == "per_head"
    assert LRPQConfig(format_version=1).attention_granularity == "per_tensor"
    with pytest.raises(ValueError, match=r"attention_granularity must be one of \['per_tensor', 'per_head'\]"):
        LRPQConfig(attention_granularity="per_token")


def test_per_head_grid_is_each_heads_float_calibration_range():
    calibration = pixels(ENOUGH_IMAGES)
    float_model, seen = build("vit"), []
    q_proj = float_model.get_submodule("vit.layers.1.attention.q_proj")
    handle = q_proj.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        float_model(pixel_values=calibration)
    handle.remove()
    heads = float_model.config.num_attention_heads
    per_head = torch.cat(seen).reshape(-1, heads, float_model.config.hidden_size // heads)  # tokens, heads, dim
    low, high = per_head.transpose(0, 1).reshape(heads, -1).aminmax(dim=1)
    scale, zero_point = scale_zero_point_from_range(low, high, 4)
    attention = quantize(calibration).get_submodule("vit.layers.1.attention")
    assert isinstance(attention.q_quant, PerHeadQuantizer)
    torch.testing.assert_close(attention.q_quant.scale, scale)
    torch.testing.assert_close(attention.q_quant.zero_point, zero_point)
    # Each head is quantized on its own grid: head 0's values only depend on head 0's scale.
    q = torch.randn(2, heads, 5, 8)
    expected = torch.stack([fake_quantize(q[:, h], scale[h], zero_point[h], 4) for h in range(heads)], dim=1)
    torch.testing.assert_close(attention.q_quant(q), expected)


def test_per_head_checkpoint_reloads_bit_identical_and_per_tensor_option(tmp_path):
    model = quantize(pixels(ENOUGH_IMAGES))
    x = pixels(4, seed=7)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded.get_submodule("vit.layers.0.attention").k_quant, PerHeadQuantizer)
    assert torch.equal(logits(loaded, x), logits(model, x))
    plain = quantize(pixels(ENOUGH_IMAGES), attention_granularity="per_tensor").get_submodule("vit.layers.0.attention")
    assert type(plain.v_quant) is UniformQuantizer and plain.v_quant.scale.shape == (1,)


def test_mlp_hidden_clipping_stays_per_channel_when_the_channels_share_a_range():
    # Too few tokens: the shared tensor-level range must not be clipped (that would cut whole outlier channels).
    calibration = pixels(4)
    clipped, minmax = input_scales(quantize(calibration)), input_scales(quantize(calibration, mlp_hidden_range="minmax"))
    for name in clipped:
        torch.testing.assert_close(clipped[name], minmax[name], msg=name)
