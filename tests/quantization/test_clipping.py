"""Clipped channel-wise quantization (CCQ) of post-LayerNorm activations."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, logits, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.quantization.clipping import clip_activation_samples, clip_channel_scales


def test_ccq_a_clamps_to_tensor_percentiles():
    samples = torch.zeros(1000, 4)
    samples[:, 0] = torch.linspace(-1, 1, 1000)
    samples[0, 3] = 500.0  # one outlier
    clipped = clip_activation_samples(samples, 0.999)
    assert clipped.max() < 500.0
    assert torch.equal(clipped[:, 1:3], samples[:, 1:3])
    expected_high = torch.quantile(samples.reshape(-1), 0.999)
    assert torch.isclose(clipped.max(), expected_high)
    with pytest.raises(ValueError, match=r"percentile must be in \(0.5, 1\]"):
        clip_activation_samples(samples, 0.3)


def test_ccq_b_bounds_the_spread_of_channel_steps():
    scale = torch.tensor([1.0, 1.0, 1.0, 100.0, 0.001])
    clipped = clip_channel_scales(scale, 4.0)
    assert torch.equal(clipped, torch.tensor([1.0, 1.0, 1.0, 4.0, 0.25]))
    assert torch.equal(clip_channel_scales(scale, 1e9), scale)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        clip_channel_scales(scale, 0.5)


@pytest.mark.parametrize("clipping", ["ccq_a", "ccq_b"])
@pytest.mark.parametrize("reparameterize", [True, False])
def test_pipeline_with_clipping_round_trips(clipping, reparameterize, tmp_path):
    from transformers import AutoModelForImageClassification

    model = build("swin")
    config = LRPQConfig(weight_bits=6, activation_bits=6, clipping=clipping, reparameterize=reparameterize)
    LRPQuantizer(config).quantize_model(model, pixels(8), show_progress=False)
    x = pixels(2, seed=4)
    expected = logits(model, x)
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True,
                                                                   disable_mmap=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(loaded.eval(), x), expected)
    norm = loaded.get_submodule("swin.encoder.layers.0.blocks.0.layernorm_before")
    assert norm.out_quant.scale.numel() == (1 if reparameterize else 16)


def test_clipping_options_are_checked():
    with pytest.raises(ValueError, match="clipping must be one of"):
        LRPQConfig(clipping="ccq_c")
    with pytest.raises(ValueError, match="clipping_ratio must be a number >= 1"):
        LRPQConfig(clipping="ccq_b", clipping_ratio=0.5)
