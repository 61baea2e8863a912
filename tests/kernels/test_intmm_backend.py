"""The `torch._int_mm` backend computes what the reference backend computes (to float rounding): random layers, every
weight width, the grids quantized models use, released codes, and tiny models end to end. On the CPU here; the same
tests run on a CUDA device where there is one."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.kernels import ActivationGrid, PackedWeight, get_backend, intmm
from optimum_lrpq.nn import QuantLinear, set_kernel_backend
from optimum_lrpq.quantization import packing, uniform
from optimum_lrpq.quantization.step_groups import group_steps

INTMM = get_backend("intmm")
REFERENCE = get_backend("reference")
DEVICES = [d for d in ("cpu", "cuda") if INTMM.is_available(torch.device(d))]

if not DEVICES:
    pytest.skip("the intmm backend needs a CUDA GPU or a CPU with VNNI / AMX", allow_module_level=True)


def random_weight(out_features: int, in_features: int, bits: int, device: str, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    if bits == 8:  # rows spanning the whole code range: the 8-bit offset (rank-1) term
        codes[: out_features // 2, 0], codes[: out_features // 2, 1] = 0, 255
    zero_point = torch.randint(0, 1 << bits, (out_features,), generator=g).float()
    scale = torch.rand(out_features, generator=g) * 0.05 + 1e-3
    return PackedWeight(packing.pack(codes, bits).to(device), bits, (out_features, in_features), scale.to(device),
                        zero_point.to(device))


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture
def counts():
    intmm.PATH_COUNTS.clear()
    return intmm.PATH_COUNTS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_bits", range(2, 9))
def test_per_tensor_grid_with_fractional_zero_point(device, weight_bits, counts):
    weight = random_weight(24, 40, weight_bits, device, seed=weight_bits)
    x = torch.randn(3, 7, 40, device=device)
    scale = ((x.max() - x.min()) / 255).reshape(1)
    zero_point = (torch.round(-x.min() / scale) + 0.37).reshape(1)  # the LayerNorm reparameterization's kind
    bias = torch.randn(24, device=device)
    for applied in (False, True):
        grid = ActivationGrid(scale, zero_point, 8, applied)
        given = uniform.fake_quantize(x, scale, zero_point, 8) if applied else x
        y = INTMM.linear(given, INTMM.prepare_weight(weight, torch.float32), bias, grid)
        expected = REFERENCE.linear(given, REFERENCE.prepare_weight(weight, torch.float32), bias, grid)
        assert relative_error(y, expected) < 1e-5
    assert counts == {"integer": 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("levels", [1, 3, intmm.MAX_BLOCKS])
def test_per_channel_grid_runs_one_product_per_level(device, weight_bits, levels, counts):
    weight = random_weight(24, 40, weight_bits, device, seed=levels)
    g = torch.Generator().manual_seed(levels)
    scale = (0.01 * 2.0 ** (torch.rand(40, generator=g) * 6)).to(device)
    zero_point = torch.randint(0, 16, (40,), generator=g).float().to(device)
    x = (torch.randn(5, 40, generator=g) * 0.2).to(device)
    bias = torch.randn(24, generator=g).to(device)
    prepared = INTMM.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    grid = ActivationGrid(scale, zero_point, 4, product_step=group_steps(scale, levels))
    assert relative_error(INTMM.linear(x, prepared, bias, grid), REFERENCE.linear(x, dense, bias, grid)) < 1e-5
    assert counts == {"integer": 1}
    too_many = ActivationGrid(scale, zero_point, 4)  # 40 distinct steps in the product
    assert torch.equal(INTMM.linear(x, prepared, bias, too_many), REFERENCE.linear(x, dense, bias, too_many))
    assert counts == {"integer": 1, "reference": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_released_codes_come_back_exactly_through_grid_changes(device, counts):
    weight = random_weight(24, 40, 8, device, seed=5)
    prepared = INTMM.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    assert INTMM.release_codes(prepared) and prepared.source.codes is None
    g = torch.Generator().manual_seed(5)
    scale = (0.01 * 2.0 ** (torch.rand(40, generator=g) * 6)).to(device)
    zero_point = torch.randint(0, 16, (40,), generator=g).float().to(device)
    grouped = ActivationGrid(scale, zero_point, 8, product_step=group_steps(scale, 4))
    per_tensor = ActivationGrid(scale[:1], zero_point[:1], 8)
    x = (torch.randn(5, 40, generator=g) * 0.2).to(device)
    for grid in (grouped, per_tensor, grouped):
        assert relative_error(INTMM.linear(x, prepared, None, grid), REFERENCE.linear(x, dense, None, grid)) < 1e-5
        assert torch.equal(INTMM.restore_codes(prepared), weight.codes)
    assert torch.equal(copy.deepcopy(prepared).codes(), weight.codes)


def test_fallbacks_are_the_reference_math(counts):
    weight = random_weight(24, 40, 4, DEVICES[0])
    prepared = INTMM.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    x = torch.randn(5, 40, device=DEVICES[0])
    assert torch.equal(INTMM.linear(x, prepared, None, None), REFERENCE.linear(x, dense, None, None))
    grid = ActivationGrid(torch.tensor([0.02], device=DEVICES[0]), torch.tensor([3.0], device=DEVICES[0]), 4)
    xb = x.bfloat16()
    assert torch.equal(INTMM.linear(xb, prepared, None, grid),
                       REFERENCE.linear(xb, REFERENCE.prepare_weight(weight, torch.bfloat16), None, grid))
    assert counts == {"reference": 2}


@pytest.mark.parametrize("name", ["vit", "swin", "deit_teacher"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_model_logits_match_reference_and_survive_save_load(name, bits, tmp_path, counts):
    device = DEVICES[-1]
    config = LRPQConfig(weight_bits=bits[0], activation_bits=bits[1])
    model = LRPQuantizer(config).quantize_model(build(name), pixels(16), show_progress=False).to(device)
    x = pixels(8, seed=7).to(device)
    set_kernel_backend(model, "reference")
    expected = logits(model, x)
    set_kernel_backend(model, "intmm")
    out = logits(model, x)
    span = (expected.max() - expected.min()).item()
    per_image = (out - expected).abs().amax(dim=-1)
    assert int((per_image > 1e-4 * span).sum()) <= 1 and torch.equal(out.argmax(-1), expected.argmax(-1))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert counts["integer"] >= len(linears) - 1 and all(m.codes_released for m in linears if m.input_quant
                                                          is not None or m.input_source is not None)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval().to(device)
    set_kernel_backend(loaded, "intmm")
    assert torch.equal(logits(loaded, x), out)
