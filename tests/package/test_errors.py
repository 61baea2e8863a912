"""Bad input gets a clear error naming the problem and the fix, and leaves the user's model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build, pixels
from transformers import (
    AutoModelForImageClassification,
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
)

from optimum_lrpq import LRPQConfig, LRPQuantizer


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, attn="sdpa"):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize(
    "model",
    [
        ConvNextForImageClassification(ConvNextConfig(image_size=32, num_labels=5, hidden_sizes=[8, 16, 32, 64])),
        BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)),
    ],
    ids=["convnext", "bert"],
)
def test_unsupported_architecture_lists_supported(model):
    before = state(model)
    with pytest.raises(ValueError, match=r"does not support .*Supported models: .*SwinForImageClassification"):
        LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(model, pixels(2))
    assert before.keys() == model.state_dict().keys()


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, "4", True, None])
def test_bits_must_be_integers_in_range(bits):
    with pytest.raises(ValueError, match="weight_bits must be"):
        LRPQConfig(weight_bits=bits)
    with pytest.raises(ValueError, match="activation_bits must be"):
        LRPQConfig(activation_bits=bits)


def test_candidate_bits_and_choices_are_checked():
    with pytest.raises(ValueError, match="candidate_bits"):
        LRPQConfig(candidate_bits=[4, 12])
    with pytest.raises(ValueError, match="softmax_quantizer must be one of"):
        LRPQConfig(softmax_quantizer="cubic")
    with pytest.raises(ValueError, match="num_calibration_samples must be a positive integer"):
        LRPQConfig(num_calibration_samples=0)


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.empty(0, 3, 32, 32), "calibration data is empty"),
        ([], "calibration data is empty"),
        (None, "needs calibration data"),
        (torch.randn(3, 32, 32), r"shape \[batch, 3, height, width\].*unsqueeze"),
        (torch.randn(2, 1, 32, 32), "expects 3 channels, got 1"),
        (torch.randn(2, 3, 64, 64), "expects 32x32 images, got 64x64"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "must be floating point"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN or Inf"),
        ("images/", "Unsupported calibration data of type str"),
        ([{"image": 1}], "need a 'pixel_values' entry"),
    ],
    ids=["empty", "empty-list", "none", "3d", "channels", "size", "uint8", "nan", "str", "dict-without-pixels"],
)
def test_bad_calibration_data(data, message):
    model = build("vit")
    before = state(model)
    with pytest.raises((ValueError, TypeError), match=message):
        LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(model, data, show_progress=False)
    assert_untouched(model, before)


def test_failure_during_calibration_restores_the_model():
    model = build("vit")
    before = state(model)
    # A NaN bias makes the activations non-finite only once the model runs.
    with torch.no_grad():
        model.vit.layers[1].mlp.fc1.bias[0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"Non-finite values .* 'vit\.layers\.1\.mlp\.fc2\.input_quant'"):
        LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(model, pixels(2), show_progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert model.config._attn_implementation == "sdpa"
    # the MLP activations moved into fc1 are back in place too
    assert all(type(layer.mlp.activation_fn).__name__ == "GELUActivation" for layer in model.vit.layers)


def test_quantizing_twice_is_refused():
    model = LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(build("vit"), pixels(2), show_progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(model, pixels(2), show_progress=False)


def _saved(tmp_path):
    model = LRPQuantizer(LRPQConfig(mixed_precision=False)).quantize_model(build("vit"), pixels(2), show_progress=False)
    model.save_pretrained(tmp_path)
    return tmp_path / "config.json"


def _edit_quant_config(path, **changes):
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def test_newer_format_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_quant_config(path, format_version=99)
    with pytest.raises(ValueError, match=r"format version 99.*pip install -U optimum-lrpq"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_unknown_config_field_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_quant_config(path, group_size=128)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['group_size'\]"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_out_of_range_layer_bits_in_checkpoint_are_refused(tmp_path):
    path = _saved(tmp_path)
    config = json.loads(path.read_text())
    config["quantization_config"]["layer_bits"]["vit.layers.0.mlp.fc1"]["weight"] = 12
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer_bits\['vit.layers.0.mlp.fc1'\]\['weight'\] must be between 2 and 8"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_checkpoint_without_layer_bits_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_quant_config(path, layer_bits=None)
    with pytest.raises(ValueError, match="no `layer_bits`"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_layer_bits_for_another_model_are_refused(tmp_path):
    path = _saved(tmp_path)
    config = json.loads(path.read_text())
    config["quantization_config"]["layer_bits"]["vit.layers.7.mlp.fc1"] = {"weight": 4, "activation": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names layers that ViTForImageClassification does not have.*layers\.7"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_quantizing_while_loading_needs_a_dataset(tmp_path):
    build("vit").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Quantizing while loading needs calibration images.*calibration_dataset="):
        AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=LRPQConfig())


def test_quantizer_arguments():
    with pytest.raises(ValueError, match="either an LRPQConfig or keyword arguments"):
        LRPQuantizer(LRPQConfig(), weight_bits=4)
    with pytest.raises(TypeError, match="config must be an LRPQConfig"):
        LRPQuantizer({"weight_bits": 4})
    assert LRPQuantizer(weight_bits=6).config.weight_bits == 6
