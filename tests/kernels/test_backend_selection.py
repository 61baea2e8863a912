"""Which kernel backend computes a quantized model: the config's `kernel_backend`, `set_kernel_backend`, the load-time
environment variable, "auto", and the fallback when a backend cannot run on a device."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification
from transformers.utils import logging

import optimum_lrpq
from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.kernels import ActivationGrid, KernelBackend, get_backend, register_backend, resolve_backend
from optimum_lrpq.kernels.reference import ReferenceBackend
from optimum_lrpq.nn import PackedWeightLayer


def _backends(model) -> set[str]:
    return {m.backend().name for m in model.modules() if isinstance(m, PackedWeightLayer)}


class _NowhereBackend(ReferenceBackend):
    """A registered backend that runs nowhere: requests for it must fall back to the reference backend."""

    name = "nowhere-test"
    priority = 1000

    def is_available(self, device: torch.device) -> bool:
        return False


register_backend(_NowhereBackend())


def test_auto_prefers_the_highest_priority_available_backend(caplog):
    chosen = resolve_backend("auto", torch.device("cpu"))
    assert chosen.name != "nowhere-test" and chosen.is_available(torch.device("cpu"))
    assert resolve_backend(None, torch.device("cpu")).name == "reference"
    logger = logging.get_logger("optimum_lrpq.kernels.backend")
    logger.addHandler(caplog.handler)
    try:
        assert resolve_backend("nowhere-test", torch.device("cpu")).name == "reference"
        assert resolve_backend("nowhere-test", torch.device("cpu")).name == "reference"
    finally:
        logger.removeHandler(caplog.handler)
    warnings = {(r.created, r.getMessage()) for r in caplog.records if r.levelname == "WARNING"}  # one per record
    assert len(warnings) == 1 and "'nowhere-test' is not available on cpu" in warnings.pop()[1]


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match="Unknown kernel backend 'fast'; choose 'auto' or one of .*reference"):
        get_backend("fast")
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        LRPQuantizer(LRPQConfig(kernel_backend="fast")).quantize_model(build("vit"), pixels(4), show_progress=False)
    with pytest.raises(ValueError, match="kernel_backend must be"):
        LRPQConfig(kernel_backend="")


def test_config_choice_is_applied_after_quantization_and_loading(tmp_path, monkeypatch):
    model = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, kernel_backend="reference")).quantize_model(
        build("vit"), pixels(8), show_progress=False)
    assert _backends(model) == {"reference"}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.quantization_config.kernel_backend == "reference" and _backends(loaded) == {"reference"}
    assert torch.equal(logits(loaded, pixels(2)), logits(model, pixels(2)))

    monkeypatch.setenv("OPTIMUM_LRPQ_KERNEL_BACKEND", "auto")
    auto = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert _backends(auto) == {resolve_backend("auto", torch.device("cpu")).name}


def test_set_kernel_backend_switches_every_quantized_layer():
    model = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(
        build("deit"), pixels(8), show_progress=False)
    layers = sum(isinstance(m, PackedWeightLayer) for m in model.modules())
    assert optimum_lrpq.set_kernel_backend(model, "nowhere-test") == layers
    assert _backends(model) == {"reference"}  # not available here: computed by the reference backend
    reference = logits(model, pixels(2))
    optimum_lrpq.set_kernel_backend(model, "reference")
    assert torch.equal(logits(model, pixels(2)), reference)


def test_a_backend_is_one_subclass_and_nn_does_not_change():
    """A new backend plugs in without touching the modules: here one that counts the calls it serves."""

    class Counting(ReferenceBackend):
        name = "counting-test"
        calls = 0

        def linear(self, x, weight, bias, input_grid: ActivationGrid | None, activation: str | None = None):
            Counting.calls += 1
            return super().linear(x, weight, bias, input_grid, activation)

    assert isinstance(register_backend(Counting()), KernelBackend)
    model = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, kernel_backend="reference")).quantize_model(
        build("swin"), pixels(8), show_progress=False)
    expected = logits(model, pixels(2))
    optimum_lrpq.set_kernel_backend(model, "counting-test")
    assert torch.equal(logits(model, pixels(2)), expected) and Counting.calls > 0
