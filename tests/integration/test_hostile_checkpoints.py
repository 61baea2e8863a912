"""Broken or tampered lrpq checkpoints fail at load time with an error naming the tensor or field."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(build("vit"), pixels(4),
                                                                                       show_progress=False)
    model.save_pretrained(path)
    return path


def tampered(saved, tmp_path, edit):
    target = tmp_path / "tampered"
    shutil.copytree(saved, target)
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def named(name: str, stored: str) -> str:
    """How errors name a tensor: as config.json and `optimum-lrpq inspect` do (transformers 5.x modules), then as
    stored on disk (legacy names); as a regular expression."""
    return re.escape(f"`{name}` (stored as `{stored}`)")


QWEIGHT = "vit.encoder.layer.0.intermediate.dense.qweight"
QWEIGHT_NAMED = named("vit.layers.0.mlp.fc1.qweight", QWEIGHT)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(QWEIGHT), rf"missing tensors {QWEIGHT_NAMED}\. It is corrupt"),
        (lambda t: t.__setitem__("vit.encoder.layer.0.backdoor", torch.zeros(2)),
         "unexpected tensors " + named("vit.layers.0.backdoor", "vit.encoder.layer.0.backdoor")),
        (lambda t: t.__setitem__(QWEIGHT, t[QWEIGHT][:, :-1].contiguous()),
         rf"tensor {QWEIGHT_NAMED} has shape \[64, 15\], expected \[64, 16\]"),
        (lambda t: t.__setitem__(QWEIGHT, t[QWEIGHT].float()), rf"tensor {QWEIGHT_NAMED} is F32, expected U8"),
        (lambda t: t.pop("vit.encoder.layer.1.attention.softmax_quant.scale"),
         "missing tensors " + named("vit.layers.1.attention.softmax_quant.scale",
                                    "vit.encoder.layer.1.attention.softmax_quant.scale")),
        # A name both schemes share is given once.
        (lambda t: t.pop("classifier.weight_scale"), r"missing tensors `classifier.weight_scale`\. It is corrupt"),
    ],
    ids=["missing", "extra", "packed-length", "dtype", "missing-quantizer", "missing-same-name"],
)
def test_tampered_tensors(saved, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(tampered(saved, tmp_path, edit))


WEIGHT_ZERO_POINT = "vit.encoder.layer.0.intermediate.dense.weight_zero_point"
INPUT_SCALE = "vit.encoder.layer.0.output.dense.input_quant.scale"


def _set_first(name: str, value: float):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set_first(WEIGHT_ZERO_POINT, 3.5),
         named("vit.layers.0.mlp.fc1.weight_zero_point", WEIGHT_ZERO_POINT) + r" has 1 zero point\(s\) not whole"),
        (_set_first(WEIGHT_ZERO_POINT, 99.0), r"not whole numbers in \[0, 15\]"),
        (_set_first(INPUT_SCALE, 0.0),
         named("vit.layers.0.mlp.fc2.input_quant.scale", INPUT_SCALE) + r" has 1 step\(s\) that are not positive"),
        (_set_first(INPUT_SCALE, float("nan")), "not positive finite"),
    ],
    ids=["fractional-weight-zero-point", "weight-zero-point-off-range", "zero-step", "nan-step"],
)
def test_grids_no_kernel_can_use_are_refused(saved, tmp_path, edit, message):
    """A hand-edited grid (integer kernels need whole weight zero points, every kernel positive steps)."""
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(tampered(saved, tmp_path, edit))


def test_truncated_file(saved, tmp_path):
    target = tmp_path / "truncated"
    shutil.copytree(saved, target)
    data = (saved / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        AutoModelForImageClassification.from_pretrained(target)


def test_pickle_checkpoint_is_never_read(saved, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(saved, target)
    (target / "model.safetensors").unlink()
    torch.save(build("vit").state_dict(), target / "pytorch_model.bin")  # a pickle file where safetensors should be
    with pytest.raises(ValueError, match=r"safetensors only; refusing to read 'pytorch_model.bin'"):
        AutoModelForImageClassification.from_pretrained(target)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight_bits", "four", "weight_bits must be an integer"),
        ("mixed_precision", "yes", "mixed_precision must be True or False"),
        ("layer_bits", [1, 2], "layer_bits must be a dict"),
        ("relevance", {"a": "high"}, "relevance must map layer names to numbers"),
        ("softmax_quantizer", "exp", "softmax_quantizer must be one of"),
    ],
)
def test_wrong_config_types(saved, tmp_path, field, value, message):
    target = tmp_path / "cfg"
    shutil.copytree(saved, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"][field] = value
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(target)


@pytest.mark.parametrize(
    "layer, message",
    [
        # A layer renamed to its on-disk (legacy) name, as read from the safetensors file: pointed at the right name.
        ("vit.encoder.layer.0.intermediate.dense",
         re.escape("names layers that ViTForImageClassification does not have: `vit.encoder.layer.0.intermediate.dense`"
                   " (the name stored on disk for `vit.layers.0.mlp.fc1`, which config.json must use)")),
        ("vit.layers.9.mlp.fc1", re.escape("does not have: `vit.layers.9.mlp.fc1`. The checkpoint does not match")),
    ],
    ids=["legacy-name", "no-such-layer"],
)
def test_config_naming_layers_the_model_does_not_have(saved, tmp_path, layer, message):
    target = tmp_path / "cfg"
    shutil.copytree(saved, target)
    config = json.loads((target / "config.json").read_text())
    layer_bits = config["quantization_config"]["layer_bits"]
    layer_bits[layer] = layer_bits.pop("vit.layers.0.mlp.fc1")
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(target)
