"""`torch.compile` of a quantized model: the same outputs as eager, without a recompilation per layer (the quantized
layers' products run eagerly inside the compiled graph; see `PackedWeightLayer.compute`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer, set_kernel_backend


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compiled_quantized_model_equals_eager(backend):
    torch._dynamo.reset()
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    set_kernel_backend(model, backend)
    x = pixels(4)
    with torch.inference_mode():
        eager = model(pixel_values=x).logits
        compiled = torch.compile(model)
        assert torch.allclose(compiled(pixel_values=x).logits, eager, atol=1e-5, rtol=1e-5)
        assert torch.allclose(compiled(pixel_values=pixels(4, seed=2)).logits,
                              model(pixel_values=pixels(4, seed=2)).logits, atol=1e-5, rtol=1e-5)
