"""`torch.compile` of a quantized model: the same outputs as eager, without a recompilation per layer (the quantized
layers' products run eagerly inside the compiled graph; see `PackedWeightLayer.compute`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, pixels
from torch._dynamo.utils import counters

from optimum_lrpq import LRPQConfig, LRPQuantizer, set_kernel_backend
from optimum_lrpq.nn import PackedWeightLayer


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compiled_quantized_model_equals_eager(backend):
    torch._dynamo.reset()
    counters.clear()
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    set_kernel_backend(model, backend)
    x, other = pixels(4), pixels(4, seed=2)  # both made outside inference_mode (its tensors guard differently)
    with torch.inference_mode():
        eager = model(pixel_values=x).logits
        compiled = torch.compile(model)
        assert torch.allclose(compiled(pixel_values=x).logits, eager, atol=1e-5, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert torch.allclose(compiled(pixel_values=other).logits, model(pixel_values=other).logits,
                              atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs  # new images: no recompilation
        # one graph per stretch between the eager quantized layers, not one per layer and call
        assert graphs <= 4 * sum(1 for m in model.modules() if isinstance(m, PackedWeightLayer))
