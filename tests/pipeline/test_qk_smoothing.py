"""`LRPQConfig(qk_smoothing=alpha)`: q and k rescaled per channel before quantization, the float function kept."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MODEL_NAMES, build, logits, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.models import get_adapter
from optimum_lrpq.nn import is_quantized_module
from optimum_lrpq.pipeline import run
from optimum_lrpq.pipeline.smoothing import AttentionRanges, ChannelRange, attention_ranges, smooth_queries_and_keys
from optimum_lrpq.quantization.smoothing import absmax


def test_option_validation():
    assert LRPQConfig(qk_smoothing=0.5).qk_smoothing == 0.5
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"qk_smoothing must be None \(off\) or a migration strength in \[0, 1\]"):
            LRPQConfig(qk_smoothing=bad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_smoothing_keeps_the_float_function_and_balances_q_and_k(name):
    model = build(name)
    layout = get_adapter(model).layout(model)
    batches = [pixels(8), pixels(8, seed=2)]
    ranges = attention_ranges(model, layout, batches, show_progress=False)
    smoothed = copy.deepcopy(model)
    smooth_queries_and_keys(smoothed, layout, ranges, 0.5)
    x = pixels(4, seed=7)
    torch.testing.assert_close(logits(smoothed, x), logits(model, x), rtol=1e-4, atol=1e-5)
    block = layout.blocks[0]
    assert not torch.equal(smoothed.get_submodule(block.k).weight, model.get_submodule(block.k).weight)
    after = attention_ranges(smoothed, layout, batches, show_progress=False)
    for block_ranges in after:  # alpha = 1/2: the same range on both sides of every channel
        query, key = (absmax(r.minimum, r.maximum) for r in (block_ranges.query, block_ranges.key))
        torch.testing.assert_close(query, key, rtol=1e-4, atol=1e-6)


def test_quantized_model_is_close_to_float_and_the_original_is_untouched():
    model = build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    config = LRPQConfig(weight_bits=8, activation_bits=8, qk_smoothing=0.5, mixed_precision=False)
    quantized = LRPQuantizer(config).quantize_model(copy.deepcopy(model), pixels(16), show_progress=False)
    x = pixels(8, seed=7)
    expected = logits(reference, x)
    assert (logits(quantized, x) - expected).norm() / expected.norm() < 0.05
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_a_failure_after_smoothing_leaves_the_model_as_given(monkeypatch):
    model = build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "calibrate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        LRPQuantizer(LRPQConfig(qk_smoothing=0.5)).quantize_model(model, pixels(8), show_progress=False)
    assert not any(is_quantized_module(m) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_ranges_of_the_wrong_width_are_named():
    model = build("vit")
    layout = get_adapter(model).layout(model)
    ranges = [AttentionRanges(*(ChannelRange(-torch.ones(3), torch.ones(3)) for _ in range(3))) for _ in layout.blocks]
    block = layout.blocks[0]
    with pytest.raises(ValueError, match=rf"{block.q} / {block.k}: 3 channel ranges for 32 output channels"):
        smooth_queries_and_keys(model, layout, ranges, 0.5)
