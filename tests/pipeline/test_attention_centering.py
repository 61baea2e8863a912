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
from optimum_lrpq.nn import PackedWeightLayer
from optimum_lrpq.pipeline import calibration, run
from optimum_lrpq.pipeline.observers import ActivationObserver
from optimum_lrpq.pipeline.smoothing import (
    AttentionRangeRecorder,
    ChannelRange,
    attention_ranges,
    center_keys_and_values,
    ranges_measurable_in_calibration,
)
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


def _quantize(model, config, ranges_in_pass: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not ranges_in_pass:
            patch.setattr(run, "ranges_measurable_in_calibration", lambda config: False)
        quantizer = LRPQuantizer(config)
        return quantizer.quantize_model(copy.deepcopy(model), pixels(32), show_progress=False), quantizer


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("options", [{"weight_bits": 8, "activation_bits": 8},
                                     {"weight_bits": 4, "activation_bits": 4, "qk_smoothing": 0.5}])
@pytest.mark.filterwarnings("ignore")
def test_ranges_measured_in_the_calibration_pass_give_the_quantization_of_a_pass_of_their_own(name, options,
                                                                                              monkeypatch):
    """The default path measures the q/k/v ranges during calibration and corrects the observations after it (no float
    pass of its own): the same grids, biases and codes as ranges measured first and folded before calibration."""
    model = build(name)
    config = LRPQConfig(**options)
    assert ranges_measurable_in_calibration(config)
    in_pass, in_pass_quantizer = _quantize(model, config, True, monkeypatch)
    separate, separate_quantizer = _quantize(model, config, False, monkeypatch)
    assert "attention_ranges" not in in_pass_quantizer.timings and "attention_ranges" in separate_quantizer.timings
    ours, theirs = in_pass.state_dict(), separate.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if key.endswith("zero_point"):  # a centred range puts the zero point on a rounding tie: either side
            assert (value.float() - theirs[key].float()).abs().max() <= 1, key
        elif value.is_floating_point():
            torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    codes = [(module.codes(), separate.get_submodule(layer).codes())  # packed bytes: a code that differs, at most
             for layer, module in in_pass.named_modules() if isinstance(module, PackedWeightLayer)]
    differ = sum(int((a != b).sum()) for a, b in codes)
    assert differ <= 1e-3 * sum(a.numel() for a, _ in codes)
    x = pixels(8, seed=7)
    expected = logits(separate, x)
    # Float rounding of the shifted ranges moves a value across a rounding tie now and then (a zero point, a code):
    # measured up to 0.7 % of the logit range on these models.
    assert (logits(in_pass, x) - expected).abs().max() <= 2e-2 * (expected.max() - expected.min())


def test_range_estimators_with_samples_keep_a_float_pass_of_their_own():
    """Kept samples cannot follow a per-channel shift, nor can a per-tensor min/max of o's inputs: those
    configurations (and mixed precision, whose trials need the ranges first) measure the ranges before calibrating."""
    assert not ranges_measurable_in_calibration(LRPQConfig(activation_range="percentile_mse"))
    assert not ranges_measurable_in_calibration(LRPQConfig(linear_input_granularity="per_tensor"))
    assert ranges_measurable_in_calibration(LRPQConfig(linear_input_granularity="per_tensor", center_values=False))
    quantizer = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, activation_range="percentile_mse"))
    model = quantizer.quantize_model(build("vit"), pixels(32), show_progress=False)
    assert "attention_ranges" in quantizer.timings
    block = get_adapter(model).layout(model).blocks[0]
    x = pixels(8, seed=7)
    assert model.get_submodule(block.k).bias.abs().max() > 0 and logits(model, x).isfinite().all()


def test_observations_that_cannot_follow_a_shift_are_refused():
    sampled = ActivationObserver("blocks.0.o_proj.input_quant", True, "percentile_mse", 1, seed=0)
    sampled.observe(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="'blocks.0.o_proj.input_quant' kept samples, which a channel shift cannot"):
        sampled.shift_channels(torch.zeros(8))
    per_tensor = ActivationObserver("q_quant", False, "minmax", 1, seed=0)
    per_tensor.observe(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="'q_quant' has 1 ranges, not one per channel of a shift of 8"):
        per_tensor.shift_channels(torch.zeros(8))
    with pytest.raises(RuntimeError, match=r"'q_quant' holds ranges of shape \(1,\), not \(4,\)"):
        per_tensor.replace_range(torch.zeros(4), torch.ones(4))
    per_channel = ActivationObserver("o", True, "minmax", 1, seed=0)
    x = torch.randn(16, 8)
    per_channel.observe(x)
    shift = torch.randn(8)
    per_channel.shift_channels(shift)
    torch.testing.assert_close(per_channel.low, (x - shift).amin(0))
    torch.testing.assert_close(per_channel.high, (x - shift).amax(0))


def test_ranges_of_layers_the_pass_did_not_reach_are_refused():
    model = build("vit")
    layout = get_adapter(model).layout(model)
    recorder = AttentionRangeRecorder(model, layout)
    recorder.remove()  # nothing ran
    with pytest.raises(RuntimeError, match=rf"The pass did not reach {layout.blocks[0].q}, {layout.blocks[0].k}"):
        recorder.ranges()


def test_observations_that_do_not_match_the_projections_are_refused_and_the_model_restored(monkeypatch):
    """The in-pass correction is exact only if each q/k/v quantizer saw its projection's outputs: otherwise the
    quantization stops, naming the quantizer, and the model is left as it was given."""
    real = AttentionRangeRecorder.ranges

    def off_by_one(self):
        ranges = real(self)
        ranges[0].key = ChannelRange(ranges[0].key.minimum - 1, ranges[0].key.maximum + 1)
        return ranges

    monkeypatch.setattr(calibration.AttentionRangeRecorder, "ranges", off_by_one)
    model = build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = get_adapter(model).layout(model).blocks[0].attention
    with pytest.raises(RuntimeError, match=rf"{attention}.k_quant observed other values than the outputs of .*k_proj; "
                                           "the attention changes cannot be folded after calibration"):
        LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(model, pixels(16),
                                                                                  show_progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
