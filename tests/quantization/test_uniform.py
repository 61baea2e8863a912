"""Uniform fake quantization: the inference forms (fresh contiguous buffer, in place) give the autograd form's values."""

from __future__ import annotations

import pytest
import torch

from optimum_lrpq.quantization.uniform import dequantize, fake_quantize, fake_quantize_, quantize


def _operands(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 7, 4, 9, generator=generator)  # [batch, tokens, heads, dim]
    scale = torch.rand(1, 1, 4, 1, generator=generator) * 0.2 + 0.01
    zero_point = torch.tensor([0.0, 3.5, 7.0, 15.0]).view(1, 1, 4, 1)
    return x, scale, zero_point


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_inference_forms_give_the_reference_values(bits):
    x, scale, zero_point = _operands(bits)
    expected = dequantize(quantize(x, scale, zero_point, bits), scale, zero_point)
    with torch.no_grad():
        assert torch.equal(fake_quantize(x, scale, zero_point, bits), expected)
        result = x.clone()
        assert fake_quantize_(result, scale, zero_point, bits) is result
        assert torch.equal(result, expected)


def test_transposed_input_gives_a_contiguous_result():
    # attention operands arrive as transposed views; the matmul reading the result should not have to copy it
    x, scale, zero_point = _operands()
    view = x.transpose(1, 2)  # [batch, heads, tokens, dim]
    scale, zero_point = scale.transpose(1, 2), zero_point.transpose(1, 2)
    with torch.no_grad():
        out = fake_quantize(view, scale, zero_point, 4)
    assert out.is_contiguous()
    assert torch.equal(out, dequantize(quantize(view, scale, zero_point, 4), scale, zero_point))


def test_in_place_form_needs_float32():
    with pytest.raises(TypeError, match="float32"):
        fake_quantize_(torch.zeros(3, dtype=torch.float16), torch.ones(1), torch.zeros(1), 4)
