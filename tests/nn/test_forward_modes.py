"""A quantized model runs in every forward mode, in any order: inference_mode, no_grad, autograd (with a backward),
and after a dtype cast; the kernel layouts built under one mode serve the others."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_every_forward_mode_in_any_order(backend):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, kernel_backend=backend)).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    for layer in model.modules():  # a fresh start: the first forward builds the layouts under inference_mode
        if hasattr(layer, "_cache_key"):
            layer._take_back_codes()
            layer._cache = None
    x = pixels(2)
    with torch.inference_mode():
        first = model(pixel_values=x).logits
    x_grad = x.clone().requires_grad_(True)
    out = model(pixel_values=x_grad).logits  # autograd after inference_mode
    out.sum().backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all()
    torch.testing.assert_close(out.detach(), first, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, first, rtol=1e-4, atol=1e-4)
    model.to(torch.float64)  # a cast after inference_mode forwards
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x.double()).logits.float(), first, rtol=1e-3, atol=1e-3)
