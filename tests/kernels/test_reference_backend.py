"""The backend registry, and the reference backend: the float math every other backend is checked against."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimum_lrpq.kernels import (
    ActivationGrid,
    ConvGeometry,
    KernelBackend,
    PackedWeight,
    available_backends,
    get_backend,
    register_backend,
)
from optimum_lrpq.kernels import backend as backend_module
from optimum_lrpq.kernels.reference import ReferenceBackend, dequantize_weight, quantize_input
from optimum_lrpq.quantization import packing, uniform

REFERENCE = get_backend("reference")


def packed(shape: tuple[int, ...], bits: int, seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    """A random packed weight of `shape` and the float weight it stands for."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    row_length = 1
    for dim in shape[1:]:
        row_length *= dim
    codes = torch.randint(0, 1 << bits, (rows, row_length), generator=g, dtype=torch.uint8)
    scale = torch.rand(rows, generator=g) * 0.1 + 1e-3
    zero_point = torch.randint(0, 1 << bits, (rows,), generator=g).float()
    weight = ((codes.float() - zero_point[:, None]) * scale[:, None]).reshape(shape)
    return PackedWeight(packing.pack(codes, bits), bits, shape, scale, zero_point), weight


class _Dummy(KernelBackend):
    name = "dummy-test-backend"

    def is_available(self, device):
        return False

    def prepare_weight(self, weight, dtype):
        return None

    def linear(self, x, weight, bias, input_grid):
        raise NotImplementedError

    def conv2d(self, x, weight, bias, input_grid, geometry):
        raise NotImplementedError


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test (registrations are global)."""
    monkeypatch.setattr(backend_module, "_BACKENDS", dict(backend_module._BACKENDS))
    return backend_module._BACKENDS


# ------------------------------------------------------------------------------------------------ registry


def test_default_and_known_backends():
    assert isinstance(get_backend(None), ReferenceBackend)
    assert get_backend() is get_backend("reference")
    assert {"reference", "onednn"} <= set(available_backends())
    assert available_backends() == sorted(available_backends())
    assert REFERENCE.is_available(torch.device("cpu")) and REFERENCE.is_available(torch.device("meta"))


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match="no-such-backend") as info:
        get_backend("no-such-backend")
    for name in available_backends():
        assert repr(name) in str(info.value)


def test_register_backend_adds_and_replaces(registry):
    dummy = _Dummy()
    assert register_backend(dummy) is dummy
    assert get_backend("dummy-test-backend") is dummy
    assert "dummy-test-backend" in available_backends()
    replacement = _Dummy()
    register_backend(replacement)
    assert get_backend("dummy-test-backend") is replacement
    assert available_backends().count("dummy-test-backend") == 1


def test_registry_is_restored_after_the_fixture():
    assert "dummy-test-backend" not in available_backends()


def test_backend_interface_is_abstract():
    with pytest.raises(TypeError):
        KernelBackend()  # type: ignore[abstract]


# ------------------------------------------------------------------------------------------------ reference math


@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_weight(bits):
    weight, expected = packed((12, 20), bits, seed=bits)
    assert torch.equal(dequantize_weight(weight, torch.float32), expected)
    assert dequantize_weight(weight, torch.bfloat16).dtype == torch.bfloat16
    conv, expected_conv = packed((6, 3, 4, 4), bits, seed=bits)
    assert torch.equal(REFERENCE.prepare_weight(conv, torch.float32), expected_conv)


@pytest.mark.parametrize("applied", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_is_float_linear_of_fake_quantized_input(per_channel, applied):
    weight, w = packed((10, 16), 4)
    x = torch.randn(2, 5, 16)
    size = 16 if per_channel else 1
    scale = torch.rand(size) * 0.05 + 0.02
    zero_point = torch.randint(0, 64, (size,)).float() + 0.25  # fractional (LayerNorm reparameterization)
    grid = ActivationGrid(scale, zero_point, 6, applied)
    bias = torch.randn(10)
    y = REFERENCE.linear(x, REFERENCE.prepare_weight(weight, torch.float32), bias, grid)
    x_used = x if applied else uniform.fake_quantize(x, scale, zero_point, 6)
    assert torch.equal(y, F.linear(x_used, w, bias))
    if not applied:  # the input really is on the grid: codes in range, exact multiples of the step from zp
        codes = x_used / scale + zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.round().min() >= 0 and codes.round().max() <= 63


def test_product_step_multiplies_the_codes_the_grid_gives():
    """With a `product_step` the layer takes (x_int - z) * product_step: the codes come from the grid's own steps."""
    weight, w = packed((10, 16), 4)
    x = torch.randn(2, 5, 16)
    scale = torch.rand(16) * 0.05 + 0.02
    zero_point = torch.randint(0, 16, (16,)).float()
    product_step = torch.full((16,), 0.5)
    grid = ActivationGrid(scale, zero_point, 4, product_step=product_step)
    codes = uniform.quantize(x, scale, zero_point, 4)
    assert torch.equal(quantize_input(x, grid), (codes - zero_point) * product_step)
    y = REFERENCE.linear(x, REFERENCE.prepare_weight(weight, torch.float32), None, grid)
    assert torch.equal(y, F.linear((codes - zero_point) * product_step, w))


def test_linear_without_grid_uses_the_input_as_is():
    weight, w = packed((10, 16), 8)
    x = torch.randn(3, 16)
    assert torch.equal(quantize_input(x, None), x)
    assert torch.equal(REFERENCE.linear(x, REFERENCE.prepare_weight(weight, torch.float32), None, None),
                       F.linear(x, w))


def test_conv2d_is_float_conv_of_fake_quantized_input():
    weight, w = packed((6, 3, 4, 4), 5)
    x = torch.randn(2, 3, 12, 12)
    grid = ActivationGrid(torch.tensor([0.03]), torch.tensor([120.0]), 8)
    bias = torch.randn(6)
    geometry = ConvGeometry(stride=4, padding=0, dilation=1, groups=1)
    y = REFERENCE.conv2d(x, REFERENCE.prepare_weight(weight, torch.float32), bias, grid, geometry)
    expected = F.conv2d(uniform.fake_quantize(x, grid.scale, grid.zero_point, 8), w, bias, stride=4)
    assert torch.equal(y, expected)


def test_linear_keeps_autograd():
    weight, w = packed((4, 8), 6)
    x = torch.randn(3, 8, requires_grad=True)
    y = REFERENCE.linear(x, REFERENCE.prepare_weight(weight, torch.float32), None, None)
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, 8))


def test_reference_layout_keeps_the_codes():
    """The dequantized float weight cannot stand in for the stored codes: a layer on the reference backend keeps
    them, and asking the backend for them is a programming error that names the backend."""
    weight, _ = packed((10, 16), 4)
    prepared = REFERENCE.prepare_weight(weight, torch.float32)
    assert REFERENCE.release_codes(prepared) is False
    with pytest.raises(NotImplementedError, match="the 'reference' backend does not release weight codes"):
        REFERENCE.restore_codes(prepared)
