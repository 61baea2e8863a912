"""Numerical edge cases: dead channels, constant inputs, huge outliers, bf16 models, one-image calibration."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import build, logits, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer

ACCURATE = {"weight_range": "percentile_mse", "activation_range": "percentile_mse"}


def hostile_swin():
    model = build("swin")
    block = model.swin.encoder.layers[0].blocks[0]
    with torch.no_grad():
        block.layernorm_before.weight[3] = 0  # a dead post-LayerNorm channel
        block.layernorm_before.bias[3] = 0
        block.mlp.fc1.weight[5] = 0  # a dead output row
        model.swin.encoder.layers[0].blocks[1].layernorm_after.weight[2] = 1e4  # an outlier channel
    return model


@pytest.mark.parametrize("clipping", [None, "ccq_a", "ccq_b"])
@pytest.mark.parametrize("data", ["varied", "one-image"])
def test_dead_channels_and_outliers_stay_finite(data, clipping):
    images = pixels(4) if data == "varied" else pixels(1)
    model = hostile_swin()
    LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, clipping=clipping, **ACCURATE)).quantize_model(
        model, images, show_progress=False)
    assert torch.isfinite(logits(model, pixels(4, seed=9))).all()


def test_constant_images_warn_and_stay_finite(caplog):
    model = build("vit")
    with caplog.at_level(logging.WARNING):
        LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
            model, torch.zeros(2, 3, 32, 32), show_progress=False)
    assert "saw a constant input" in caplog.text
    assert "patch_embeddings.projection.input_quant" in caplog.text
    assert torch.isfinite(logits(model, pixels(2))).all()


def test_bf16_model():
    x = pixels(4, seed=7)
    reference = logits(build("vit"), x)
    model = build("vit").to(torch.bfloat16)
    LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8, mixed_precision=True)).quantize_model(
        model, pixels(8).to(torch.bfloat16), show_progress=False)
    out = logits(model, x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()
    fc1 = model.get_submodule("vit.layers.0.mlp.fc1")
    assert fc1.qweight.dtype == torch.uint8 and fc1.bias.dtype == torch.bfloat16
