"""The oneDNN integer backend computes what the reference backend computes (to float rounding), on random layers and
on every tiny model, before and after a save/load round trip."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from tiny_models import MODEL_NAMES, build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.kernels import ActivationGrid, ConvGeometry, PackedWeight, get_backend, memory, onednn
from optimum_lrpq.models import get_adapter
from optimum_lrpq.nn import QuantLayerNorm, QuantLinear, set_kernel_backend
from optimum_lrpq.quantization import packing, uniform
from optimum_lrpq.quantization.step_groups import group_steps

ONEDNN = get_backend("onednn")
REFERENCE = get_backend("reference")

if not ONEDNN.is_available(torch.device("cpu")):
    pytest.skip("the oneDNN backend needs oneDNN int8 ops and a CPU with VNNI or AMX", allow_module_level=True)


# ------------------------------------------------------------------------------------------------ helpers


def random_weight(out_features: int, in_features: int, bits: int, seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    """A packed weight with random codes and per-row grids, and its codes (uint8 [out, in])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    if bits == 8:  # half the rows span the full code range, as min/max calibration gives (the rank-1 correction);
        half = out_features // 2  # the others use 64..191, which fits int8 around some zero points only
        codes[:half, 0], codes[:half, 1] = 0, 255
        codes[half:] = codes[half:] // 2 + 64
    zero_point = torch.randint(0, 1 << bits, (out_features,), generator=g).float()
    scale = torch.rand(out_features, generator=g) * 0.05 + 1e-3
    return PackedWeight(packing.pack(codes, bits), bits, (out_features, in_features), scale, zero_point), codes


def random_grid(x: torch.Tensor, bits: int, applied: bool, fraction: float = 0.37) -> tuple[ActivationGrid, torch.Tensor]:
    """A per-tensor grid over `x`'s range with a fractional zero point, and the input a layer gets on it."""
    scale = ((x.max() - x.min()) / uniform.qmax(bits)).reshape(1)
    zero_point = (torch.round(-x.min() / scale) + fraction).reshape(1).clamp(0, uniform.qmax(bits))
    if applied:  # the producer already put x on the grid
        x = uniform.fake_quantize(x, scale, zero_point, bits)
    return ActivationGrid(scale, zero_point, bits, applied), x


def exact_linear(x, grid: ActivationGrid, weight: PackedWeight, codes: torch.Tensor, bias) -> torch.Tensor:
    """sx*sw*((qx - zx) @ (qw - zw)ᵀ) + b in float64, on the codes of the reference formula."""
    qx = uniform.quantize(x.float(), grid.scale, grid.zero_point, grid.bits).double()
    w = (codes.double() - weight.zero_point.double()[:, None]) * weight.scale.double()[:, None]
    return ((qx - grid.zero_point.double()) * grid.scale.double()) @ w.T + bias.double()


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture
def counts():
    onednn.PATH_COUNTS.clear()
    return onednn.PATH_COUNTS


# ------------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("weight_bits", range(2, 9))
def test_linear_matches_reference_at_every_bit_width(weight_bits, counts):
    weight, codes = random_weight(40, 72, weight_bits, seed=weight_bits)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    assert isinstance(prepared, onednn.OneDNNWeight)
    assert (prepared.offset is not None) == (weight_bits == 8)  # only 8-bit rows can fail to fit int8
    bias = torch.randn(40)
    for activation_bits in range(2, 9):
        for applied in (False, True):
            x = torch.randn(3, 11, 72) * 2 + 0.5
            grid, x = random_grid(x, activation_bits, applied)
            y = ONEDNN.linear(x, prepared, bias, grid)
            assert y.shape == (3, 11, 40) and y.dtype == torch.float32
            expected = exact_linear(x, grid, weight, codes, bias)
            assert relative_error(y, expected) < 1e-6, (activation_bits, applied)
            assert relative_error(y, REFERENCE.linear(x, dense, bias, grid)) < 1e-5, (activation_bits, applied)
    assert counts == {"integer": 14}


def test_linear_without_bias_and_with_integer_zero_point(counts):
    weight, codes = random_weight(16, 24, 4)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    x = torch.randn(5, 24)
    grid, x = random_grid(x, 8, False, fraction=0.0)
    y = ONEDNN.linear(x, prepared, None, grid)
    assert relative_error(y, exact_linear(x, grid, weight, codes, torch.zeros(16))) < 1e-6
    assert counts["integer"] == 1


def test_fallbacks_are_the_reference_math(counts):
    weight, _ = random_weight(16, 24, 6)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    bias = torch.randn(16)
    x = torch.randn(2, 7, 24)
    per_channel = ActivationGrid(torch.rand(24) * 0.05 + 0.01, torch.randint(0, 16, (24,)).float() + 0.5, 4)
    for grid in (None, per_channel, ActivationGrid(per_channel.scale, per_channel.zero_point, 4, applied=True)):
        assert torch.equal(ONEDNN.linear(x, prepared, bias, grid), REFERENCE.linear(x, dense, bias, grid))
    assert counts == {"reference": 3}
    # a per-channel grid whose channels share one value is per tensor: integer path
    shared = ActivationGrid(torch.full((24,), 0.02), torch.full((24,), 7.5), 6)
    y = ONEDNN.linear(x, prepared, bias, shared)
    assert relative_error(y, REFERENCE.linear(x, dense, bias, shared)) < 1e-5
    assert counts["integer"] == 1
    # other dtypes: the reference math in that dtype
    grid, _ = random_grid(x, 8, False)
    xb = x.bfloat16()
    yb = ONEDNN.linear(xb, ONEDNN.prepare_weight(weight, torch.bfloat16), bias.bfloat16(), grid)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, REFERENCE.linear(xb, REFERENCE.prepare_weight(weight, torch.bfloat16), bias.bfloat16(),
                                            grid))
    assert ONEDNN.linear(xb, prepared, bias.bfloat16(), grid).dtype == torch.bfloat16


@pytest.mark.parametrize("block_elements", [1 << 19, 160])  # one block of rows; blocks of 4 rows (27 = 6*4 + 3)
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("groups", [2, 5, onednn.MAX_STEP_GROUPS])
def test_per_channel_grid_with_few_steps_runs_one_gemm_per_step(weight_bits, groups, counts, block_elements, monkeypatch):
    """Per-channel steps from a small set (fractional per-channel zero points): integer, equal to the reference."""
    monkeypatch.setattr(onednn, "QUANTIZE_BLOCK_ELEMENTS", block_elements)
    weight, _ = random_weight(24, 40, weight_bits, seed=groups)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    g = torch.Generator().manual_seed(groups)
    steps = 0.01 * 2.0 ** torch.arange(groups, dtype=torch.float32)
    scale = steps[torch.randint(0, groups, (40,), generator=g)]
    scale[:groups] = steps  # every step used
    zero_point = torch.randint(0, 16, (40,), generator=g).float() + torch.rand(40, generator=g)
    grid = ActivationGrid(scale, zero_point, 4)
    x = torch.randn(3, 9, 40, generator=g) * 0.1
    bias = torch.randn(24, generator=g)
    y = ONEDNN.linear(x, prepared, bias, grid)
    reference = REFERENCE.linear(x, dense, bias, grid)
    assert relative_error(y, reference) < 1e-5
    assert counts == {"integer": 1}
    too_many = ActivationGrid(0.01 * (1 + torch.arange(40, dtype=torch.float32) / 40), zero_point, 4)
    assert torch.equal(ONEDNN.linear(x, prepared, bias, too_many), REFERENCE.linear(x, dense, bias, too_many))
    assert counts == {"integer": 1, "reference": 1}


@pytest.mark.parametrize("block_elements", [1 << 19, 160])
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("levels", [1, 3, onednn.MAX_STEP_GROUPS])
def test_product_steps_run_one_gemm_per_level(weight_bits, levels, counts, block_elements, monkeypatch):
    """Steps folded into the weight over a few levels (`input_step_levels`): every channel has its own step (codes),
    the product takes one of `levels` steps: integer, equal to the reference."""
    monkeypatch.setattr(onednn, "QUANTIZE_BLOCK_ELEMENTS", block_elements)
    weight, _ = random_weight(24, 40, weight_bits, seed=levels)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    g = torch.Generator().manual_seed(levels)
    scale = 0.01 * 2.0 ** (torch.rand(40, generator=g) * 6)  # 40 distinct steps
    zero_point = torch.randint(0, 16, (40,), generator=g).float()
    grid = ActivationGrid(scale, zero_point, 4, product_step=group_steps(scale, levels))
    x = torch.randn(3, 9, 40, generator=g) * 0.2
    bias = torch.randn(24, generator=g)
    y = ONEDNN.linear(x, prepared, bias, grid)
    assert relative_error(y, REFERENCE.linear(x, dense, bias, grid)) < 1e-5
    assert counts == {"integer": 1}
    too_many = ActivationGrid(scale, zero_point, 4, product_step=scale)  # 40 product steps
    assert torch.equal(ONEDNN.linear(x, prepared, bias, too_many), REFERENCE.linear(x, dense, bias, too_many))
    assert counts == {"integer": 1, "reference": 1}


def test_consumers_of_one_producer_share_the_input_codes(monkeypatch):
    """q, k and v read one LayerNorm output: it is quantized once, and again only when it changes."""
    calls = []
    real = onednn._quantize
    monkeypatch.setattr(onednn, "_quantize", lambda *a: calls.append(1) or real(*a))
    weights = [ONEDNN.prepare_weight(random_weight(16, 24, 4, seed=i)[0], torch.float32) for i in range(3)]
    grid, x = random_grid(torch.randn(5, 24), 6, applied=True)
    grid = dataclasses.replace(grid, shared=True)  # a producer's grid
    with torch.no_grad():
        first = [ONEDNN.linear(x, w, None, grid) for w in weights]
        assert len(calls) == 1
        x.mul_(0.5)  # the same tensor, edited in place: new codes
        second = [ONEDNN.linear(x, w, None, grid) for w in weights]
        assert len(calls) == 2 and not torch.equal(first[0], second[0])
        fresh = x.clone()  # equal values, another tensor: quantized again
        assert torch.equal(ONEDNN.linear(fresh, weights[0], None, grid), second[0]) and len(calls) == 3
        own = ActivationGrid(grid.scale, grid.zero_point, grid.bits)  # a layer's own grid: never shared
        ONEDNN.linear(x, weights[0], None, own)
        ONEDNN.linear(x, weights[1], None, own)
        assert len(calls) == 5


def test_autograd_falls_back_or_keeps_the_bias_gradient(counts):
    weight, _ = random_weight(16, 24, 4)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    x0 = torch.randn(3, 24)
    grid, _ = random_grid(x0, 8, False)
    bias = torch.randn(16, requires_grad=True)
    # input gradients: the reference math
    x = x0.clone().requires_grad_(True)
    y = ONEDNN.linear(x, prepared, bias, grid)
    y.square().sum().backward()
    xr = x0.clone().requires_grad_(True)
    REFERENCE.linear(xr, dense, bias.detach(), grid).square().sum().backward()
    assert torch.equal(x.grad, xr.grad) and counts == {"reference": 1}
    # only the bias requires grad: integer path, and the bias still gets its gradient
    bias.grad = None
    y = ONEDNN.linear(x0, prepared, bias, grid)
    assert y.requires_grad and counts["integer"] == 1
    y.sum().backward()
    assert torch.equal(bias.grad, torch.full((16,), 3.0))
    with torch.no_grad():
        assert torch.equal(ONEDNN.linear(x0, prepared, bias, grid), y.detach())


def test_grid_and_bias_edits_are_seen():
    weight, _ = random_weight(16, 24, 4)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    x = torch.randn(4, 24)
    grid, _ = random_grid(x, 8, False)
    bias = torch.randn(16)
    before = ONEDNN.linear(x, prepared, bias, grid)
    with torch.no_grad():
        grid.scale.mul_(1.5)
        grid.zero_point.add_(0.25)
        bias.add_(1.0)
    after = ONEDNN.linear(x, prepared, bias, grid)
    assert not torch.allclose(before, after)
    assert relative_error(after, REFERENCE.linear(x, dense, bias, grid)) < 1e-5
    other = ActivationGrid(grid.scale * 2, grid.zero_point.clone(), 8)  # a new grid object (set_grid replaces)
    assert relative_error(ONEDNN.linear(x, prepared, bias, other), REFERENCE.linear(x, dense, bias, other)) < 1e-5


@pytest.mark.parametrize("block_elements", [1 << 19, 700, 100])  # one block; ragged blocks of 7 rows; 1 row each
def test_input_codes_are_the_reference_codes(block_elements, monkeypatch):
    monkeypatch.setattr(onednn, "QUANTIZE_BLOCK_ELEMENTS", block_elements)
    # values on and next to every rounding boundary, fractional zero point
    scale, zero_point = torch.tensor([0.0173]), torch.tensor([100.37])
    k = torch.arange(-20, 280).float() + 0.5
    x = (k - zero_point) * scale
    x = torch.cat([x, x.nextafter(torch.tensor(1e9)), x.nextafter(torch.tensor(-1e9)), torch.randn(3000)])
    x = x.reshape(-1, 100)
    for bits in (2, 4, 7, 8):  # codes up to 127 are stored through int8, 8-bit ones through int32
        expected = uniform.quantize(x, scale, zero_point, bits).to(torch.uint8)
        assert torch.equal(onednn._quantize_eager(x, scale, zero_point, uniform.qmax(bits)), expected)
        assert torch.equal(onednn._quantize_math(x, scale, zero_point, uniform.qmax(bits)), expected)
    scales, zero_points = torch.linspace(0.01, 0.03, 100), torch.linspace(0, 255, 100).round()  # per channel
    assert torch.equal(onednn._quantize_eager(x, scales, zero_points, 255),
                       uniform.quantize(x, scales, zero_points, 8).to(torch.uint8))


@pytest.mark.parametrize("columns", [1, 3, 768, 3072])
def test_code_sums_are_exact(columns, monkeypatch):
    # the rank-1 term of 8-bit weight rows reads these sums: oneDNN's GEMM against ones, exactly the integer sums
    codes = torch.randint(0, 256, (37, columns), dtype=torch.uint8, generator=torch.Generator().manual_seed(columns))
    codes[0] = 255  # the largest sum of the width
    expected = codes.sum(dim=1, dtype=torch.int64)
    assert codes.numel() < onednn._CodeSums.MIN_ELEMENTS  # small: the widening sum
    assert torch.equal(onednn._CODE_SUMS(codes).to(torch.int64), expected)
    monkeypatch.setattr(onednn._CodeSums, "MIN_ELEMENTS", 0)  # as for large inputs: oneDNN's GEMM against ones
    assert torch.equal(onednn._CODE_SUMS(codes).to(torch.int64), expected)
    monkeypatch.setattr(onednn._CodeSums, "MAX_COLUMNS", 0)  # wider than oneDNN's exact range: the widening sum
    assert torch.equal(onednn._CODE_SUMS(codes).to(torch.int64), expected)


def test_consumers_of_one_producer_share_the_code_sums(monkeypatch, counts):
    """8-bit weight rows need the input's per-row code sums: q, k and v compute them once for their shared codes."""
    calls = []
    real = onednn._CodeSums.__call__
    monkeypatch.setattr(onednn._CodeSums, "__call__", lambda self, codes: calls.append(1) or real(self, codes))
    packed = [random_weight(16, 24, 8, seed=i) for i in range(3)]
    weights = [ONEDNN.prepare_weight(w, torch.float32) for w, _ in packed]
    assert all(w.offset is not None for w in weights)  # the rank-1 term applies
    grid, x = random_grid(torch.randn(5, 24), 8, applied=True)
    grid = dataclasses.replace(grid, shared=True)  # a producer's grid
    bias = torch.randn(16)
    with torch.no_grad():
        outputs = [ONEDNN.linear(x, w, bias, grid) for w in weights]
        assert len(calls) == 1 and counts == {"integer": 3}
        for y, (w, codes) in zip(outputs, packed, strict=True):
            assert relative_error(y, exact_linear(x, grid, w, codes, bias)) < 1e-6
        x.mul_(0.5)  # new codes, new sums
        ONEDNN.linear(x, weights[0], bias, grid)
        assert len(calls) == 2
        own = ActivationGrid(grid.scale, grid.zero_point, grid.bits)  # a layer's own grid: nothing shared
        ONEDNN.linear(x, weights[0], bias, own)
        ONEDNN.linear(x, weights[1], bias, own)
        assert len(calls) == 4


def test_compiled_input_quantization_is_bit_identical(monkeypatch):
    monkeypatch.setattr(onednn, "COMPILE_QUANTIZE", True)
    scale, zero_point = torch.tensor([0.0173]), torch.tensor([100.37])
    x = ((torch.arange(-20, 280).float() + 0.5 - zero_point) * scale).repeat(3)
    x = torch.cat([x[:300], x[300:600].nextafter(torch.tensor(1e9)), x[600:].nextafter(torch.tensor(-1e9))])
    x = torch.cat([x, torch.randn(2100)]).reshape(-1, 100)
    codes = onednn._quantize(x, scale, zero_point, 255)
    if onednn._compile_failed:
        pytest.skip("torch.compile does not work here (the backend fell back to eager ops)")
    assert torch.equal(codes, uniform.quantize(x, scale, zero_point, 8).to(torch.uint8))
    assert torch.equal(onednn._quantize(x[:7], scale, zero_point, 15),  # other shape and bits: no recompile needed
                       uniform.quantize(x[:7], scale, zero_point, 4).to(torch.uint8))


def test_unavailable_backend_computes_the_reference_math(monkeypatch):
    monkeypatch.setattr(onednn, "_SUPPORTED", False)  # as on a CPU without VNNI/AMX or a torch without the ops
    assert not ONEDNN.is_available("cpu")
    weight, _ = random_weight(16, 24, 4)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    assert isinstance(prepared, torch.Tensor)
    x = torch.randn(4, 24)
    grid, _ = random_grid(x, 8, False)
    assert torch.equal(ONEDNN.linear(x, prepared, None, grid),
                       REFERENCE.linear(x, REFERENCE.prepare_weight(weight, torch.float32), None, grid))


def test_conv2d_is_the_reference_conv():
    rows, _ = random_weight(8, 3 * 4 * 4, 5)
    weight = PackedWeight(rows.codes, 5, (8, 3, 4, 4), rows.scale, rows.zero_point)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    assert isinstance(prepared, torch.Tensor)
    x = torch.randn(2, 3, 16, 16)
    grid, _ = random_grid(x, 8, False)
    geometry = ConvGeometry(4, 0, 1, 1)
    bias = torch.randn(8)
    assert torch.equal(ONEDNN.conv2d(x, prepared, bias, grid, geometry),
                       REFERENCE.conv2d(x, REFERENCE.prepare_weight(weight, torch.float32), bias, grid, geometry))


def test_prepared_weight_copies_and_pickles():
    weight, _ = random_weight(16, 24, 8)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    x = torch.randn(4, 24)
    grid, _ = random_grid(x, 8, False)
    y = ONEDNN.linear(x, prepared, None, grid)
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        assert isinstance(clone, onednn.OneDNNWeight)
        assert torch.equal(ONEDNN.linear(x, clone, None, grid), y)


def test_availability_is_cpu_only():
    assert ONEDNN.is_available("cpu")
    assert not ONEDNN.is_available("meta")
    assert not ONEDNN.is_available(torch.device("cuda"))


# ------------------------------------------------------------------------------------------------ models
#
# End to end, the two backends differ only by float rounding (~1e-7 of the logit range), except where such a
# difference upstream of a quantizer (e.g. k_proj's output before the per-head k grid) moves a value across a
# rounding boundary: then one code differs by one step (a "code flip"), as it would between two float BLAS builds
# or thread counts. On the tiny models that happens for about one image in a thousand, so the end-to-end check
# allows one image of the batch a flip-sized deviation; the layer-by-layer check is flip-free and tight.

CONFIGS = {
    "w8a8": {"weight_bits": 8, "activation_bits": 8},
    "w4a8": {"weight_bits": 4, "activation_bits": 8},
    "w4a4": {"weight_bits": 4, "activation_bits": 4},
    "mixed": {"weight_bits": 5, "activation_bits": 6, "mixed_precision": True},  # 4..8-bit layers
}


def assert_same_logits(out: torch.Tensor, expected: torch.Tensor) -> None:
    span = (expected.max() - expected.min()).item()
    per_image = (out - expected).abs().amax(dim=-1)
    assert int((per_image > 1e-4 * span).sum()) <= 1, per_image / span
    assert per_image.max().item() <= 2e-2 * span, per_image / span
    assert torch.equal(out.argmax(-1), expected.argmax(-1))


@torch.no_grad()
def outputs(model, x, backend: str) -> list[torch.Tensor]:
    set_kernel_backend(model, backend)
    out = model(pixel_values=x)
    return [t for t in (out.logits, getattr(out, "cls_logits", None), getattr(out, "distillation_logits", None))
            if t is not None]


@torch.no_grad()
def layer_errors(model, x) -> dict[str, float]:
    """Run the model on the reference backend; each quantized linear also computes its output with the oneDNN
    backend on the very same input. Relative error per layer (no code flips can accumulate)."""
    set_kernel_backend(model, "reference")
    errors = {}

    def check(name):
        def hook(module, args, out):
            module.kernel_backend = "onednn"
            try:
                errors[name] = relative_error(module.forward(args[0]), out)
            finally:
                module.kernel_backend = "reference"
        return hook

    handles = [module.register_forward_hook(check(name)) for name, module in model.named_modules()
               if isinstance(module, QuantLinear)]
    try:
        model(pixel_values=x)
    finally:
        for handle in handles:
            handle.remove()
    return errors


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_logits_match_reference(name, config, tmp_path, counts):
    options = {"mixed_precision": False, **CONFIGS[config]}
    model = LRPQuantizer(LRPQConfig(**options)).quantize_model(build(name), pixels(16), show_progress=False)
    x = pixels(8, seed=7)
    expected = outputs(model, x, "reference")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, disable_mmap=True).eval()
    for candidate in (model, loaded):
        counts.clear()
        for out, ref in zip(outputs(candidate, x, "onednn"), expected, strict=True):
            assert_same_logits(out, ref)
        assert counts["integer"] > 0
        errors = layer_errors(candidate, x)
        assert errors and max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layernorms_leave_the_rounding_to_integer_consumers(name):
    """A quantized LayerNorm whose readers all turn its output into integer codes does not round it in float first:
    the same codes, the same logits; on the reference backend, or with a reader kept in float, it rounds."""
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(build(name), pixels(16),
                                                                                      show_progress=False)
    norms = [m for m in model.modules() if isinstance(m, QuantLayerNorm)]
    x = pixels(8, seed=7)
    set_kernel_backend(model, "onednn")
    assert all(norm._rounded_by_consumers() for norm in norms if norm.__dict__.get("_consumers"))
    deferred = [norm for norm in norms if norm._rounded_by_consumers()]
    assert deferred
    with torch.no_grad():
        out = model(pixel_values=x).logits
        for norm in deferred:
            norm.__dict__["_consumers"] = None  # rounds its output again
        rounded = model(pixel_values=x).logits
    assert_same_logits(out, rounded)
    assert torch.equal(out.argmax(-1), rounded.argmax(-1))
    set_kernel_backend(model, "reference")
    assert not any(norm._rounded_by_consumers() for norm in norms)

    layout = get_adapter(build(name)).layout(build(name))
    kept = layout.blocks[0].q
    partly = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, modules_to_not_convert=[kept])).quantize_model(
        build(name), pixels(16), show_progress=False)
    set_kernel_backend(partly, "onednn")
    group = next(g for g in layout.groups if kept in g.consumers)
    norm = partly.get_submodule(group.layernorm)  # the float q reads its output: rounded (or not quantized at all)
    assert not isinstance(norm, QuantLayerNorm) or not norm._rounded_by_consumers()


@pytest.mark.parametrize("levels", [1, 4])
def test_per_channel_inputs_run_on_the_integer_path_end_to_end(levels, counts):
    """Enough calibration tokens for per-channel o_proj / fc2 grids (folded over `levels` levels): every linear is
    integer, and the logits match the reference backend."""
    calibration = pixels(61)  # 61 x 17 tokens >= MIN_ROWS_PER_CHANNEL
    config = LRPQConfig(weight_bits=4, activation_bits=4, num_calibration_samples=61, input_step_levels=levels)
    model = LRPQuantizer(config).quantize_model(build("vit"), calibration, show_progress=False)
    fc2 = model.get_submodule("vit.layers.0.mlp.fc2")
    assert fc2.input_quant.scale.unique().numel() > levels  # a real per-channel grid
    x = pixels(8, seed=7)
    expected = outputs(model, x, "reference")
    counts.clear()
    for out, ref in zip(outputs(model, x, "onednn"), expected, strict=True):
        assert_same_logits(out, ref)
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert counts == {"integer": linears}  # no reference fallback left
    errors = layer_errors(model, x)
    assert max(errors.values()) < 1e-5, errors


# ------------------------------------------------------------------------------------------------ kept outputs


@pytest.fixture
def kept_outputs(monkeypatch):
    """Every output reused (the real threshold keeps the reuse to outputs of >= 32 MB)."""
    buffers = memory.OutputBuffers(min_bytes=0)
    monkeypatch.setattr(onednn, "OUTPUT_BUFFERS", buffers)
    return buffers


def test_outputs_reuse_memory_that_nobody_holds(kept_outputs, monkeypatch, counts):
    weight, _ = random_weight(40, 72, 4)
    eight, _ = random_weight(40, 72, 8, seed=1)  # rank-1 term
    grid, _ = random_grid(torch.randn(6, 72), 4, False)
    bias = torch.randn(40)
    prepared = [ONEDNN.prepare_weight(w, torch.float32) for w in (weight, eight)]
    inputs = [torch.randn(6, 72) for _ in range(4)]
    with torch.no_grad():
        monkeypatch.setenv("OPTIMUM_LRPQ_REUSE_OUTPUTS", "0")
        fresh = [[ONEDNN.linear(x, w, bias, grid, activation) for x in inputs] for w in prepared
                 for activation in (None, "gelu")]
        assert kept_outputs.kept_bytes() == 0
        monkeypatch.delenv("OPTIMUM_LRPQ_REUSE_OUTPUTS")
        cases = [(w, activation) for w in prepared for activation in (None, "gelu")]
        for (w, activation), expected in zip(cases, fresh, strict=True):
            kept_outputs.release()
            first = ONEDNN.linear(inputs[0], w, bias, grid, activation)
            second = ONEDNN.linear(inputs[1], w, bias, grid, activation)  # `first` is held: another buffer
            assert first.data_ptr() != second.data_ptr()
            address = first.data_ptr()
            row = first[2]  # a view keeps the buffer in use
            del first
            third = ONEDNN.linear(inputs[2], w, bias, grid, activation)  # two buffers in use: a fresh output
            assert third.data_ptr() not in (address, second.data_ptr())
            assert kept_outputs.kept_bytes() == 2 * 6 * 40 * 4
            assert torch.equal(row, expected[0][2]) and torch.equal(second, expected[1])  # not overwritten
            assert torch.equal(third, expected[2])
            del row
            fourth = ONEDNN.linear(inputs[3], w, bias, grid, activation)  # nobody holds the first buffer now
            assert fourth.data_ptr() == address and torch.equal(fourth, expected[3])
    assert counts == {"integer": 32}
    assert memory.release_output_buffers() == 0  # the module's own buffers (min 32 MB): none made here
    assert kept_outputs.release() == 2 * 6 * 40 * 4 and kept_outputs.kept_bytes() == 0


@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("levels", [0, 3])  # per-channel steps from 5 values (one GEMM each); steps over 3 levels
def test_per_channel_grids_add_every_group_into_the_kept_output(weight_bits, levels, kept_outputs, monkeypatch):
    weight, _ = random_weight(24, 40, weight_bits, seed=levels)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    g = torch.Generator().manual_seed(levels)
    if levels:
        scale = 0.01 * 2.0 ** (torch.rand(40, generator=g) * 6)
        grid = ActivationGrid(scale, torch.randint(0, 16, (40,), generator=g).float(), 4,
                              product_step=group_steps(scale, levels))
    else:
        steps = 0.01 * 2.0 ** torch.arange(5, dtype=torch.float32)
        scale = steps[torch.randint(0, 5, (40,), generator=g)]
        scale[:5] = steps
        grid = ActivationGrid(scale, torch.randint(0, 16, (40,), generator=g).float() + torch.rand(40, generator=g), 4)
    x, bias = torch.randn(3, 9, 40, generator=g) * 0.2, torch.randn(24, generator=g)
    with torch.no_grad():
        monkeypatch.setenv("OPTIMUM_LRPQ_REUSE_OUTPUTS", "0")
        fresh = ONEDNN.linear(x, prepared, bias, grid)
        monkeypatch.delenv("OPTIMUM_LRPQ_REUSE_OUTPUTS")
        kept = ONEDNN.linear(x, prepared, bias, grid)
    assert isinstance(prepared.terms(grid, bias), onednn._GroupedTerms)
    assert kept_outputs.kept_bytes() == 27 * 24 * 4 and torch.equal(kept, fresh)


def test_kept_outputs_stay_within_their_budget():
    buffers = memory.OutputBuffers(min_bytes=0, max_bytes=3 * 4 * 10 * 4)  # three 4 x 10 outputs
    cpu = torch.device("cpu")
    held = [buffers.take(4, 10, cpu) for _ in range(3)]  # two per shape: the third is not kept
    assert held[2] is None and buffers.kept_bytes() == 2 * 160
    other = buffers.take(2, 20, cpu)
    assert other is not None and buffers.kept_bytes() == 3 * 160
    assert buffers.take(1, 40, cpu) is None  # over the budget while the others are in use
    del held, other
    assert buffers.take(1, 40, cpu) is not None and buffers.kept_bytes() <= 3 * 160  # the oldest were dropped
    assert memory.OutputBuffers().take(4, 10, cpu) is None  # below the default size: allocated as usual


def test_model_outputs_with_kept_memory_are_the_same_and_never_overwritten(kept_outputs, monkeypatch):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(build("vit"), pixels(16),
                                                                                      show_progress=False)
    set_kernel_backend(model, "onednn")
    first, second = pixels(4, seed=3), pixels(4, seed=4)
    monkeypatch.setenv("OPTIMUM_LRPQ_REUSE_OUTPUTS", "0")
    expected = [logits(model, x) for x in (first, second)]
    monkeypatch.delenv("OPTIMUM_LRPQ_REUSE_OUTPUTS")
    captured = []  # what a user's hooks keep: every linear output of the first forward
    handles = [m.register_forward_hook(lambda module, args, out: captured.append((out, out.clone())))
               for m in model.modules() if isinstance(m, QuantLinear)]
    assert torch.equal(logits(model, first), expected[0])
    for handle in handles:
        handle.remove()
    assert torch.equal(logits(model, second), expected[1]) and torch.equal(logits(model, first), expected[0])
    assert kept_outputs.kept_bytes() > 0
    assert captured and all(torch.equal(kept, copy_) for kept, copy_ in captured)


def test_model_copies_and_falls_back_under_grad(counts):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=8)).quantize_model(build("vit"), pixels(16),
                                                                                      show_progress=False)
    x = pixels(4, seed=3)
    set_kernel_backend(model, "onednn")
    y = logits(model, x)
    clone = copy.deepcopy(model)  # the prepared weights (opaque oneDNN tensors) are rebuilt, not copied
    assert torch.equal(logits(clone, x), y)
    assert not any(t.is_mkldnn for t in clone.state_dict().values())
    # grad mode: the LayerNorm parameters make every linear input require grad -> the reference math, with autograd
    set_kernel_backend(model, "reference")
    expected = model(pixel_values=x).logits
    set_kernel_backend(model, "onednn")
    counts.clear()
    out = model(pixel_values=x).logits
    assert torch.equal(out, expected) and counts["integer"] == 0
    out.sum().backward()
    assert any(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ weight held once


def stored_codes(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items() if name.endswith("qweight")}


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_integer_layers_hold_their_weight_once_and_give_the_codes_back(weight_bits, tmp_path):
    """On the integer path the prepacked int8 matrix is the only copy of a linear's weight: `qweight` becomes a
    one-byte placeholder, and everything that reads the codes (state_dict, save, moves, copies, another backend,
    load_state_dict) gets the real ones."""
    config = LRPQConfig(weight_bits=weight_bits, activation_bits=8)
    model = LRPQuantizer(config).quantize_model(build("vit"), pixels(16), show_progress=False)
    x = pixels(4, seed=3)
    codes = stored_codes(model)
    set_kernel_backend(model, "reference")
    reference = logits(model, x)
    set_kernel_backend(model, "onednn")
    integer = logits(model, x)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(m.codes_released for m in linears.values())
    assert all(m.qweight.untyped_storage().nbytes() == 1 for m in linears.values())
    assert model.get_submodule("vit.embeddings.patch_embeddings.projection").codes_released is False  # conv: float
    # the codes read back are the stored ones, bit for bit
    after = stored_codes(model)
    assert after.keys() == codes.keys() and all(torch.equal(after[k], codes[k]) for k in codes)
    name, layer = next(iter(linears.items()))
    assert torch.equal(layer.codes(), codes[name + ".qweight"])
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), dequantize_from(codes[name + ".qweight"], layer))
    # save -> load: same codes, same logits on both backends
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert all(torch.equal(t, codes[k]) for k, t in stored_codes(loaded).items())
    assert torch.equal(logits(loaded, x), integer)
    # a copy, a move and another backend all see the real codes
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, x), integer)
    model.to("cpu", torch.float32)
    assert not any(m.codes_released for m in linears.values())
    assert all(torch.equal(m.qweight, codes[n + ".qweight"]) for n, m in linears.items())
    set_kernel_backend(model, "reference")
    assert torch.equal(logits(model, x), reference)
    set_kernel_backend(model, "onednn")
    assert torch.equal(logits(model, x), integer) and all(m.codes_released for m in linears.values())
    # load_state_dict into released layers
    model.load_state_dict(loaded.state_dict())
    assert all(torch.equal(m.qweight, codes[n + ".qweight"]) for n, m in linears.items())
    assert torch.equal(logits(model, x), integer)


def dequantize_from(codes: torch.Tensor, layer) -> torch.Tensor:
    rows = packing.unpack(codes, layer.weight_bits, layer.in_features).float()
    return (rows - layer.weight_zero_point[:, None]) * layer.weight_scale[:, None]


def test_released_grouped_weight_survives_grid_changes(counts):
    """Released codes held by per-group packs: changing the grid (grouped -> per tensor -> grouped) keeps the weight."""
    weight, _ = random_weight(24, 40, 8, seed=11)
    prepared = ONEDNN.prepare_weight(weight, torch.float32)
    dense = REFERENCE.prepare_weight(weight, torch.float32)
    g = torch.Generator().manual_seed(11)
    scale = 0.01 * 2.0 ** (torch.rand(40, generator=g) * 6)
    zero_point = torch.randint(0, 16, (40,), generator=g).float()
    grouped = ActivationGrid(scale, zero_point, 8, product_step=group_steps(scale, 4))
    per_tensor = ActivationGrid(scale[:1], zero_point[:1], 8)
    x = torch.randn(5, 40, generator=g) * 0.2
    assert ONEDNN.release_codes(prepared)
    for grid in (grouped, per_tensor, grouped, per_tensor):
        assert relative_error(ONEDNN.linear(x, prepared, None, grid), REFERENCE.linear(x, dense, None, grid)) < 1e-5
        assert torch.equal(ONEDNN.restore_codes(prepared), weight.codes)
    assert counts == {"integer": 4}


# ------------------------------------------------------------------------------------------------ q, k, v as one GEMM


def shared_input_groups(model) -> list:
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get("_input_group")) is not None}
    return list(groups.values())


def without_groups(model):
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module.__dict__.pop("_input_group", None)
    return clone


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_q_k_v_run_as_one_gemm_with_the_same_logits(name, monkeypatch):
    config = LRPQConfig(weight_bits=5, activation_bits=6, mixed_precision=True)  # q, k, v at different bits
    model = LRPQuantizer(config).quantize_model(build(name), pixels(16), show_progress=False)
    groups = shared_input_groups(model)
    blocks = sum(1 for m in model.modules() if hasattr(m, "softmax_quant"))  # the quantized attention modules
    assert len(groups) == blocks > 0 and all(len(g.members) == 3 for g in groups)
    x = pixels(8, seed=7)
    alone = outputs(without_groups(model), x, "onednn")
    calls = []
    real = torch.ops.onednn.qlinear_pointwise

    class Counting:  # counts the oneDNN GEMMs of a forward
        def __call__(self, *args):
            calls.append(args[3])
            return real(*args)

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", Counting())
    grouped = outputs(model, x, "onednn")
    for a, b in zip(grouped, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert len(calls) == linears - 2 * len(groups)
    for group in groups:  # each member's weight now lives in the stacked matrix only
        for member in group.members:
            assert member._cache.packed is None and member._cache.stack[0] is group._layout


def test_grouped_members_keep_exact_codes_and_survive_moves(tmp_path):
    model = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(build("deit"), pixels(16),
                                                                                       show_progress=False)
    codes = stored_codes(model)
    x = pixels(4, seed=3)
    set_kernel_backend(model, "onednn")
    y = logits(model, x)
    assert all(g._layout is not None for g in shared_input_groups(model))
    after = stored_codes(model)  # read back from the stacked matrices
    assert all(torch.equal(after[k], codes[k]) for k in codes)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert all(g._layout is not None for g in shared_input_groups(loaded))  # stacked at load
    assert torch.equal(logits(loaded, x), y)
    model.to("cpu", torch.float32)  # a move takes the codes back and drops the stacked layout
    assert all(g._layout is None for g in shared_input_groups(model))
    assert torch.equal(logits(model, x), y)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, x), y)
    set_kernel_backend(model, "reference")  # no grouped product there: each layer computes its own
    logits(model, x)
    assert all(g._layout is None for g in shared_input_groups(model))


def test_a_member_called_on_another_or_edited_input_computes_its_own():
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=8)).quantize_model(build("vit"), pixels(16),
                                                                                      show_progress=False)
    set_kernel_backend(model, "onednn")
    group = shared_input_groups(model)[0]
    query, key, value = group.members
    alone = without_groups(model)
    names = {id(m): n for n, m in model.named_modules()}
    key_alone = alone.get_submodule(names[id(key)])
    value_alone = alone.get_submodule(names[id(value)])
    source = group.members[0].input_source  # the producer's grid: feed inputs already on it
    with torch.no_grad():
        h = source(torch.randn(2, 5, query.in_features))
        query(h)  # computes k and v too, kept for this very tensor
        assert torch.equal(key(h), key_alone(h))
        h.mul_(-1)  # edited in place: the kept value output no longer holds
        assert torch.equal(value(h), value_alone(h))
        other = h.clone()
        assert torch.equal(key(other), key_alone(other))


def test_a_group_needs_two_layers():
    from optimum_lrpq.nn.fusion import SharedInputGroup, group_shared_input

    layer = QuantLinear(4, 4, True, 4, None)
    assert group_shared_input([layer]) is None and "_input_group" not in layer.__dict__
    with pytest.raises(ValueError, match="A shared-input group needs at least two layers"):
        SharedInputGroup([layer])
