"""Inference attention runs blockwise and in place (`nn.attention._attention_in_place`): the same probabilities and
logits as the plain path on every architecture, and only where nothing needs the intermediate tensors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_NAMES, build, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import attention


@pytest.fixture
def in_place_calls(monkeypatch):
    calls = []
    run = attention._attention_in_place

    def spy(*args, **kwargs):
        calls.append(args[0])
        return run(*args, **kwargs)

    monkeypatch.setattr(attention, "_attention_in_place", spy)
    return calls


def _forward(model, x):
    out = model(pixel_values=x, output_attentions=True)
    return out.logits, out.attentions


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("options", [{"weight_bits": 4, "activation_bits": 4},
                                     {"weight_bits": 8, "activation_bits": 8, "softmax_quantizer": "uniform"}],
                         ids=["w4a4-log", "w8a8-uniform"])
def test_in_place_attention_equals_the_plain_path(name, options, in_place_calls, monkeypatch):
    model = LRPQuantizer(LRPQConfig(**options)).quantize_model(build(name), pixels(16), show_progress=False)
    # blocks of 3 batch items: several blocks and a ragged last one
    monkeypatch.setattr(attention, "IN_PLACE_BLOCK_ELEMENTS", 3 * 4 * 17 * 17 if name != "swin" else 3 * 2 * 16 * 16)
    x = pixels(8, seed=3)
    with torch.inference_mode():
        logits, probs = _forward(model, x)
    assert in_place_calls, "inference did not take the in-place path"
    monkeypatch.setattr(attention, "_in_place_applies", lambda *args: False)
    with torch.inference_mode():
        expected_logits, expected_probs = _forward(model, x)
    assert torch.equal(logits, expected_logits)
    assert len(probs) == len(expected_probs)
    for p, expected in zip(probs, expected_probs, strict=True):
        assert torch.equal(p, expected)


def test_in_place_path_only_where_nothing_needs_the_intermediates(in_place_calls):
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build("vit"), pixels(16), show_progress=False)
    x = pixels(2)
    with torch.no_grad():
        model(pixel_values=x)
    assert len(in_place_calls) == 2  # one per block, under no_grad as under inference_mode
    in_place_calls.clear()
    x.requires_grad_(True)
    model(pixel_values=x).logits.sum().backward()  # autograd keeps the plain path (it needs the probabilities)
    assert not in_place_calls and x.grad is not None
    seen = []

    class Recorder:  # calibrating: observers see whole tensors through the plain path
        def observe(self, t):
            seen.append(t.shape)

    model.vit.layers[0].attention.softmax_quant.observer = Recorder()
    with torch.no_grad():
        model(pixel_values=x.detach())
    assert len(in_place_calls) == 1 and seen == [torch.Size([2, 4, 17, 17])]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_probabilities_are_kept_only_when_collected(name, monkeypatch):
    """Without `output_attentions` nothing reads the probabilities: each block reuses one buffer, the logits stay
    the same, and with `output_attentions` every layer's probabilities are still returned."""
    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build(name), pixels(16), show_progress=False)
    monkeypatch.setattr(attention, "IN_PLACE_BLOCK_ELEMENTS", 3 * 4 * 17 * 17 if name != "swin" else 3 * 2 * 16 * 16)
    returned = []
    run = attention._attention_in_place

    def spy(*args):
        output, probs = run(*args)
        returned.append(probs)
        return output, probs

    monkeypatch.setattr(attention, "_attention_in_place", spy)
    x = pixels(8, seed=3)
    with torch.inference_mode():
        logits = model(pixel_values=x).logits
        assert returned and all(probs is None for probs in returned)
        returned.clear()
        collected = model(pixel_values=x, output_attentions=True)
    assert returned and all(probs is not None for probs in returned)
    assert torch.equal(logits, collected.logits) and len(collected.attentions) > 0
    assert attention.probabilities_requested()  # outside a model's forward: kept, a caller may read them


def test_probabilities_are_kept_where_the_collector_cannot_be_read(monkeypatch):
    monkeypatch.setattr(attention, "_OUTPUT_COLLECTOR", None)  # a transformers without the output collector
    assert attention.probabilities_requested()

    class Broken:
        def get(self):
            raise RuntimeError("changed internals")

    monkeypatch.setattr(attention, "_OUTPUT_COLLECTOR", Broken())
    assert attention.probabilities_requested()

    class Collecting:
        def __init__(self, collected):
            self.collected = collected

        def get(self):
            return self.collected

    monkeypatch.setattr(attention, "_OUTPUT_COLLECTOR", Collecting({"hidden_states": []}))
    assert not attention.probabilities_requested()  # a forward that collects other outputs only
    monkeypatch.setattr(attention, "_OUTPUT_COLLECTOR", Collecting({"attentions": []}))
    assert attention.probabilities_requested()
    monkeypatch.setattr(attention, "_OUTPUT_COLLECTOR", Collecting({"cross_attentions": []}))
    assert attention.probabilities_requested()
