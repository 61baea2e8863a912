"""`LRPQConfig(center_keys=..., center_values=...)`: k and v shifted to their channel midranges, the float function
kept (softmax ignores a shift shared by a row; probabilities sum to one, o's bias takes v's shift back)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MODEL_NAMES, build, logits, pixels
from transformers import ViTConfig, ViTForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.models import get_adapter
from optimum_lrpq.pipeline.smoothing import attention_ranges, center_keys_and_values
from optimum_lrpq.quantization.smoothing import midrange

BATCHES = [pixels(8), pixels(8, seed=2)]


def test_option_validation():
    config = LRPQConfig()
    assert config.center_keys is True and config.center_values is True
    assert LRPQConfig.from_dict(LRPQConfig(center_values=False).to_dict()).center_values is False
    for flag in ("center_keys", "center_values"):
        with pytest.raises(ValueError, match=rf"{flag} must be True or False, got 'yes'"):
            LRPQConfig(**{flag: "yes"})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_centring_keeps_the_float_function_and_centres_k_and_v(name):
    model = build(name)
    layout = get_adapter(model).layout(model)
    ranges = attention_ranges(model, layout, BATCHES, show_progress=False)
    centred = copy.deepcopy(model)
    expected = center_keys_and_values(centred, layout, ranges)
    x = pixels(4, seed=7)
    torch.testing.assert_close(logits(centred, x), logits(model, x), rtol=1e-4, atol=1e-5)
    block = layout.blocks[0]
    assert not torch.equal(centred.get_submodule(block.k).bias, model.get_submodule(block.k).bias)
    after = attention_ranges(centred, layout, BATCHES, show_progress=False)
    for measured, predicted, before in zip(after, expected, ranges, strict=True):
        for channel in (measured.key, measured.value):  # every channel symmetric around zero now
            torch.testing.assert_close(channel.minimum, -channel.maximum, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(measured.key.maximum, predicted.key.maximum, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(measured.value.minimum, predicted.value.minimum, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(measured.query.maximum, before.query.maximum, rtol=1e-4, atol=1e-5)  # q kept
        assert not torch.equal(before.key.maximum, predicted.key.maximum)  # `ranges` itself was not modified


def test_quantization_centres_the_converted_copies_only():
    model = build("vit")
    layout = get_adapter(model).layout(model)
    block = layout.blocks[0]
    ranges = attention_ranges(model, layout, [pixels(16)], show_progress=False)[0]
    float_o = copy.deepcopy(model.get_submodule(block.o))
    calibration = pixels(16)

    quantized = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(
        copy.deepcopy(model), calibration, show_progress=False)
    off = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, center_keys=False, center_values=False))
    plain = off.quantize_model(copy.deepcopy(model), calibration, show_progress=False)
    # The conversion also rewrites these biases (the LayerNorm's channel factors fold into q/k/v), the same way in
    # both runs: what centring adds is the shift.
    key_shift, value_shift = (midrange(r.minimum, r.maximum) for r in (ranges.key, ranges.value))
    bias = {name: (quantized.get_submodule(name).bias, plain.get_submodule(name).bias)
            for name in (block.k, block.v, block.o)}
    torch.testing.assert_close(bias[block.k][0] - bias[block.k][1], -key_shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias[block.v][0] - bias[block.v][1], -value_shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias[block.o][0] - bias[block.o][1], float_o.weight @ value_shift, rtol=1e-4,
                               atol=1e-5)
    x = pixels(8, seed=7)
    reference = logits(model, x)
    for result in (quantized, plain):
        assert (logits(result, x) - reference).norm() / reference.norm() < 0.05

    # A layer kept in float is the user's own module: never edited, and v is not centred without o to take it back.
    kept = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, modules_to_not_convert=[block.o]))
    partly = kept.quantize_model(copy.deepcopy(model), calibration, show_progress=False)
    assert torch.equal(partly.get_submodule(block.o).bias, float_o.bias)
    torch.testing.assert_close(partly.get_submodule(block.v).bias, bias[block.v][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(partly.get_submodule(block.k).bias, bias[block.k][0], rtol=1e-4, atol=1e-5)


def test_projections_without_bias_are_left_as_they_are():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=5, qkv_bias=False)
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    layout = get_adapter(model).layout(model)
    ranges = attention_ranges(model, layout, BATCHES, show_progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    centred = center_keys_and_values(model, layout, ranges)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert all(c.key.maximum.equal(r.key.maximum) for c, r in zip(centred, ranges, strict=True))
    reference = copy.deepcopy(model)
    quantized = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(
        model, pixels(16), show_progress=False)  # the converted copies carry a bias (the LayerNorm folds into it)
    x = pixels(8, seed=7)
    expected = logits(reference, x)
    assert (logits(quantized, x) - expected).norm() / expected.norm() < 0.05


def test_ranges_of_the_wrong_width_are_named():
    model = build("vit")
    layout = get_adapter(model).layout(model)
    ranges = attention_ranges(model, layout, BATCHES, show_progress=False)
    ranges[0].key.minimum, ranges[0].key.maximum = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=rf"{layout.blocks[0].k}: 3 channel ranges for 32 output channels"):
        center_keys_and_values(model, layout, ranges)
