"""The MLP's GELU moved into the fc1 that feeds it (`nn.fusion`): same outputs on every backend and architecture,
set again on load, undone with the conversion, and only for the exact GELU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_NAMES, build, pixels
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification
from transformers.activations import ACT2FN, GELUActivation

from optimum_lrpq import LRPQConfig, LRPQuantizer, set_kernel_backend
from optimum_lrpq.kernels import ActivationGrid, PackedWeight, apply_activation, get_backend
from optimum_lrpq.nn import QuantLinear
from optimum_lrpq.nn.fusion import ActivationInProducer, movable_activation
from optimum_lrpq.quantization import packing

BACKENDS = ["reference"] + (["onednn"] if get_backend("onednn").is_available(torch.device("cpu")) else [])


def test_only_the_exact_gelu_moves():
    assert movable_activation(GELUActivation()) == "gelu"
    assert movable_activation(torch.nn.GELU()) == "gelu"
    assert movable_activation(GELUActivation(use_gelu_python=True)) is None  # another formula (same in theory)
    assert movable_activation(torch.nn.GELU(approximate="tanh")) is None
    assert movable_activation(ACT2FN["gelu_pytorch_tanh"]) is None
    assert movable_activation(torch.nn.ReLU()) is None


def test_unknown_activation_is_refused():
    layer = QuantLinear(4, 3, True, weight_bits=8, input_bits=8)
    with pytest.raises(ValueError, match=r"cannot apply activation 'relu'.*\('gelu',\)"):
        layer.take_activation("relu")
    with pytest.raises(ValueError, match="Unknown activation 'silu'"):
        apply_activation(torch.zeros(2), "silu")


def _without_fusion(model) -> None:
    """Put plain GELU modules back and stop fc1 applying it (the model as it computed before the move)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ActivationInProducer):
            model.get_submodule(module.producer).activation = None
            model.set_submodule(name, GELUActivation())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_moved_activation_gives_the_same_outputs(name, backend, tmp_path):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build(name), pixels(16), show_progress=False)
    placeholders = [m for m in model.modules() if isinstance(m, ActivationInProducer)]
    fc1s = [m for n, m in model.named_modules() if n.endswith("mlp.fc1")]
    assert placeholders and len(placeholders) == len(fc1s)
    assert all(isinstance(m, QuantLinear) and m.activation == "gelu" for m in fc1s)
    x = pixels(4, seed=5)
    set_kernel_backend(model, backend)
    with torch.inference_mode():
        moved = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, ActivationInProducer) for m in loaded.modules()) == len(placeholders)
    set_kernel_backend(loaded, backend)
    _without_fusion(model)
    with torch.inference_mode():
        assert torch.equal(loaded(pixel_values=x).logits, moved)
        assert torch.equal(model(pixel_values=x).logits, moved)  # oneDNN's GELU post-op is torch's erf GELU


ALL_BACKENDS = BACKENDS + ["intmm"]  # intmm runs on CPUs with integer units too when asked for by name


@pytest.mark.parametrize("zero_point", [128.0, 100.0])  # integer grid (fused post-op), offset rows (GELU after)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backends_apply_gelu_under_every_grad_mode(backend, zero_point):
    backend = get_backend(backend)
    if not backend.is_available(torch.device("cpu")) and backend.name != "intmm":
        pytest.skip(f"{backend.name} needs {backend.requirements}")
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (24, 16), generator=generator, dtype=torch.uint8)
    weight = PackedWeight(packing.pack(codes, 8), 8, (24, 16), torch.rand(24, generator=generator) * 0.01 + 1e-3,
                          torch.full((24,), zero_point))
    prepared = backend.prepare_weight(weight, torch.float32)
    grid = ActivationGrid(torch.tensor([0.05]), torch.tensor([128.0]), 8)
    x, bias = torch.randn(5, 16, generator=generator), torch.randn(24, generator=generator)
    with torch.no_grad():
        expected = torch.nn.functional.gelu(backend.linear(x, prepared, bias, grid))
    with torch.inference_mode():
        assert torch.equal(backend.linear(x, prepared, bias, grid, "gelu"), expected)
    with torch.no_grad():
        assert torch.equal(backend.linear(x, prepared, bias, grid, "gelu"), expected)
    bias.requires_grad_(True)
    y = backend.linear(x, prepared, bias, grid, "gelu")  # the bias' gradient goes through the GELU
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert bias.grad is not None and bool((bias.grad > -0.2).all())  # GELU'(z) >= -0.17


def test_an_activation_that_cannot_move_stays():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=5, hidden_act="gelu_pytorch_tanh")
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    quantized = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(
        model, pixels(16), show_progress=False)
    assert not any(isinstance(m, ActivationInProducer) for m in quantized.modules())
    assert all(m.activation is None for m in quantized.modules() if isinstance(m, QuantLinear))
