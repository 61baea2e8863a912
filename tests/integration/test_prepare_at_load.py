"""Loading a quantized checkpoint builds the integer kernel layouts right away (`nn.prepare_kernels`): the stored codes
are released before the first forward, outputs and saved files are unchanged, and offloaded models are left alone."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.kernels import get_backend, return_freed_memory
from optimum_lrpq.nn import PackedWeightLayer, QuantLinear

ONEDNN = get_backend("onednn").is_available(torch.device("cpu"))


@pytest.mark.skipif(not ONEDNN, reason="needs a CPU with int8 dot products (the onednn backend)")
def test_loaded_model_holds_int8_layouts_before_any_forward(tmp_path):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, kernel_backend="onednn")).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.codes_released for m in linears)  # prepared when quantization ended
    x = pixels(3, seed=4)
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "a")
    assert all(m.codes_released for m in loaded.modules() if isinstance(m, QuantLinear))
    loaded.save_pretrained(tmp_path / "b")  # the codes come back from the layouts, bit for bit
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(logits(loaded, x), expected)


def test_reference_backend_prepares_nothing_at_load(tmp_path):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, kernel_backend="reference")).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, PackedWeightLayer)]
    assert layers and not any(m.codes_released for m in layers)  # its float copies wait for the first forward
    assert all(m._cache_key is None for m in layers)


def test_freed_memory_goes_back_where_the_c_library_allows():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert return_freed_memory() is glibc  # malloc_trim exists exactly with glibc; elsewhere a no-op
