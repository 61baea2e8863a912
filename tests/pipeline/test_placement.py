"""Models placed by accelerate: device_map with cpu/disk offload, execution-device hooks, cpu_offload."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import QuantLinear

CONFIG = {"weight_bits": 4, "activation_bits": 4, "mixed_precision": True}


def quantize(model):
    return LRPQuantizer(LRPQConfig(**CONFIG)).quantize_model(model, pixels(8), show_progress=False)


def offload_map(name):
    """Half the blocks on disk, the rest offloaded to CPU RAM (no GPU here; the main device is the CPU)."""
    if name == "swin":
        return {"swin.embeddings": "cpu", "swin.encoder.layers.0": "cpu", "swin.encoder.layers.1": "disk",
                "swin.layernorm": "cpu", "classifier": "cpu"}
    return {"vit.embeddings": "cpu", "vit.layers.0": "cpu", "vit.layers.1": "disk", "vit.layernorm": "cpu",
            "classifier": "cpu"}


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_offloaded_model_quantizes_like_the_plain_one(name, tmp_path):
    build(name).save_pretrained(tmp_path / "float")
    expected_model = quantize(build(name))
    expected = logits(expected_model, pixels(3, seed=9))

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "float", device_map=offload_map(name),
                                                            offload_folder=tmp_path / "offload")
    assert any(getattr(m, "_hf_hook", None) is not None and m._hf_hook.offload for m in model.modules())
    assert any(p.device.type == "meta" for p in model.parameters())
    qmodel = quantize(model)
    assert not any(p.device.type == "meta" for p in qmodel.parameters())
    assert not any(getattr(m, "_hf_hook", None) is not None and m._hf_hook.offload for m in qmodel.modules())
    assert torch.equal(logits(qmodel, pixels(3, seed=9)), expected)
    assert qmodel.config.quantization_config.layer_bits == expected_model.config.quantization_config.layer_bits
    assert not hasattr(qmodel, "hf_device_map")  # everything now lives in CPU memory: not an offloaded model

    qmodel.save_pretrained(tmp_path / "quantized")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "quantized", disable_mmap=True)
    assert torch.equal(logits(loaded, pixels(3, seed=9)), expected)


def test_execution_device_hooks_move_to_the_quantized_modules():
    expected = logits(quantize(build("vit")), pixels(3, seed=9))
    model = dispatch_model(build("vit"), device_map={"vit": "cpu", "classifier": "cpu"}, force_hooks=True)
    assert model.classifier._hf_hook is not None
    qmodel = quantize(model)
    assert isinstance(qmodel.classifier, QuantLinear)
    assert qmodel.classifier._hf_hook.execution_device == "cpu"  # the replaced Linear's hook was carried over
    assert torch.equal(logits(qmodel, pixels(3, seed=9)), expected)


def test_cpu_offload_model_quantizes():
    expected = logits(quantize(build("deit")), pixels(3, seed=9))
    model = cpu_offload(build("deit"), execution_device="cpu")
    assert any(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(logits(quantize(model), pixels(3, seed=9)), expected)


def test_quantized_checkpoint_loads_with_a_device_map(tmp_path):
    qmodel = quantize(build("vit"))
    expected = logits(qmodel, pixels(3, seed=9))
    qmodel.save_pretrained(tmp_path / "q")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert torch.equal(logits(loaded, pixels(3, seed=9)), expected)
    offloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "q", device_map=offload_map("vit"),
                                                                offload_folder=tmp_path / "offload")
    assert torch.equal(logits(offloaded, pixels(3, seed=9)), expected)


def test_offloaded_module_cannot_be_replaced_before_onloading():
    from optimum_lrpq.pipeline.placement import carry_hook

    model = cpu_offload(build("vit"), execution_device="cpu")
    with pytest.raises(ValueError, match="still offloaded; call placement.onload first"):
        carry_hook(model.classifier, torch.nn.Identity())  # its weights live in the offload map
