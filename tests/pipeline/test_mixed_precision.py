"""Mixed precision end to end: relevance -> allocation under the budgets -> quantized model that round-trips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.models import get_adapter
from optimum_lrpq.pipeline.mixed_precision import (
    UNIFORM_FALLBACK_RATIO,
    layer_macs,
    prefers_uniform,
    uniform_fallback_ratio,
)
from optimum_lrpq.pipeline.sensitivity import logit_loss
from optimum_lrpq.pipeline.units import allocation_units


def quantize(name="vit", **options):
    model = build(name)
    layout = get_adapter(model).layout(model)
    macs = layer_macs(model, [n for n in layout.weight_layers() if n != layout.patch_embedding], pixels(1))
    sizes = {n: model.get_submodule(n).weight.numel() for n in macs}
    # the allocation itself, not the uniform fallback (tested below), unless a test asks for it
    defaults = {"weight_bits": 4, "activation_bits": 4, "uniform_fallback": False}
    quantizer = LRPQuantizer(LRPQConfig(mixed_precision=True, **{**defaults, **options}))
    quantizer.quantize_model(model, pixels(8), show_progress=False)
    return model, quantizer, layout, sizes, macs


def averages(layer_bits, sizes, macs):
    w = sum(layer_bits[n]["weight"] * s for n, s in sizes.items()) / sum(sizes.values())
    a = sum(layer_bits[n]["activation"] * m for n, m in macs.items()) / sum(macs.values())
    return w, a


@pytest.mark.parametrize("name", ["vit", "deit_teacher", "swin", "dinov2"])
def test_budgets_hold_and_shared_quantizers_agree(name):
    model, quantizer, layout, sizes, macs = quantize(name)
    bits = model.config.quantization_config.layer_bits
    w, a = averages(bits, sizes, macs)
    assert w <= 4 + 1e-9 and a <= 4 + 1e-9
    for group in layout.groups:
        widths = {bits[c]["activation"] for c in group.consumers}
        assert widths == {bits[group.layernorm]["activation"]}
    for block in layout.blocks:
        assert bits[block.attention]["activation"] == bits[block.attention_linears[0]]["activation"]
    assert bits[layout.patch_embedding] == {"weight": 4, "activation": 8}
    # relevance: one score per quantizable layer, normalized, saved with the model
    assert set(quantizer.relevance) == set(layout.weight_layers())
    assert abs(sum(quantizer.relevance.values()) - 1) < 1e-6
    assert model.config.quantization_config.relevance == quantizer.relevance


def test_mixed_bits_actually_differ_and_round_trip(tmp_path):
    model, _, _, sizes, _ = quantize("vit", weight_bits=6, activation_bits=6)
    bits = model.config.quantization_config.layer_bits
    assert len({bits[n]["weight"] for n in sizes}) > 1, bits
    x = pixels(2, seed=3)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["layer_bits"] == bits and saved["mixed_precision"] is True
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True,
                                                                   disable_mmap=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(loaded.eval(), x), expected)
    for name in sizes:
        assert loaded.get_submodule(name).weight_bits == bits[name]["weight"]


def test_uniform_allocation_equals_uniform_bits():
    model, *_ = quantize("vit", allocation="uniform")
    bits = model.config.quantization_config.layer_bits
    assert {e.get("weight", 4) for e in bits.values()} == {4}


def test_random_allocation_is_feasible_and_seeded():
    first, _, _, sizes, macs = quantize("swin", allocation="random", seed=3)
    second, *_ = quantize("swin", allocation="random", seed=3)
    bits = first.config.quantization_config.layer_bits
    assert bits == second.config.quantization_config.layer_bits
    w, a = averages(bits, sizes, macs)
    assert w <= 4 + 1e-9 and a <= 4 + 1e-9


def test_different_weight_and_activation_budgets():
    model, _, _, sizes, macs = quantize("vit", weight_bits=4, activation_bits=8, allocation="magnitude")
    w, a = averages(model.config.quantization_config.layer_bits, sizes, macs)
    assert w <= 4 + 1e-9 and a <= 8 + 1e-9


def test_units_group_shared_inputs():
    model = build("vit")
    layout = get_adapter(model).layout(model)
    from optimum_lrpq.pipeline.conversion import plan_layer_bits

    units = allocation_units(layout, plan_layer_bits(layout, LRPQConfig()))
    first = units[0]
    assert first.layernorm == "vit.layers.0.layernorm_before"
    assert first.layers == tuple(f"vit.layers.0.attention.{p}_proj" for p in "qkv")


def test_label_target_needs_labels():
    model = build("vit")
    with pytest.raises(ValueError, match="relevance_target='label' needs labels"):
        LRPQuantizer(LRPQConfig(mixed_precision=True, relevance_target="label")).quantize_model(
            model, pixels(4), show_progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_label_target_with_labels():
    model = build("vit")
    batches = [{"pixel_values": b, "labels": torch.tensor([0, 1, 2, 3])} for b in pixels(8).split(4)]
    quantizer = LRPQuantizer(LRPQConfig(mixed_precision=True, relevance_target="label"))
    quantizer.quantize_model(model, batches, show_progress=False)
    assert abs(sum(quantizer.relevance.values()) - 1) < 1e-6


def test_relevance_uses_the_first_num_relevance_samples_images():
    from optimum_lrpq.relevance import compute_relevance

    expected = compute_relevance(build("vit"), [pixels(8)[:3]])
    _, quantizer, *_ = quantize("vit", num_relevance_samples=3, calibration_batch_size=2)
    assert quantizer.relevance == pytest.approx(expected, abs=1e-6)
    _, everything, *_ = quantize("vit", num_relevance_samples=None)
    assert everything.relevance == pytest.approx(compute_relevance(build("vit"), [pixels(8)]), abs=1e-6)


def test_calibration_subset_keeps_batches_and_labels():
    from optimum_lrpq.pipeline.calibration_data import CalibrationSet

    images = CalibrationSet([torch.zeros(3, 1), torch.ones(3, 1), torch.full((2, 1), 2.0)],
                            [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7])])
    subset = images.first(5)
    assert [b.shape[0] for b in subset.batches] == [3, 2] and subset.num_images == 5
    assert torch.equal(torch.cat(subset.labels), torch.arange(5))
    assert images.first(None) is images and images.first(100) is images


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_num_relevance_samples_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="num_relevance_samples"):
        LRPQConfig(num_relevance_samples=value)


def _kl_on(model, images, reference):
    quantized = logits(model, images)
    return float(logit_loss(quantized, reference, "kl").mean())


@pytest.mark.parametrize("budget", [4, 6])
def test_uniform_fallback_keeps_the_plan_closer_to_the_float_model(budget, caplog):
    images = pixels(8)
    reference = logits(build("vit"), images)
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        model, quantizer, *_ = quantize("vit", weight_bits=budget, activation_bits=budget,
                                        uniform_fallback=True)
    check = quantizer.uniform_check
    # the two trial measurements are those of real quantizations of the float model with each plan
    uniform_model = LRPQuantizer(LRPQConfig(weight_bits=budget, activation_bits=budget)).quantize_model(
        build("vit"), images, show_progress=False)
    assert check["uniform"] == pytest.approx(_kl_on(uniform_model, images, reference), rel=1e-5, abs=1e-12)
    allocation_model = LRPQuantizer(LRPQConfig(
        weight_bits=budget, activation_bits=budget, mixed_precision=True, uniform_fallback=False)).quantize_model(
        build("vit"), images, show_progress=False)
    assert check["allocation"] == pytest.approx(_kl_on(allocation_model, images, reference), rel=1e-5, abs=1e-12)
    bits = model.config.quantization_config.layer_bits
    uniform_bits = uniform_model.config.quantization_config.layer_bits
    if check["uniform"] < uniform_fallback_ratio(budget, budget) * check["allocation"]:
        assert bits == uniform_bits
        assert "keeping uniform bits" in caplog.text and "uniform_fallback=False" in caplog.text
    else:
        assert bits == allocation_model.config.quantization_config.layer_bits != uniform_bits
        assert "keeping uniform bits" not in caplog.text
    assert "uniform_check" in quantizer.timings


def test_uniform_fallback_is_skipped_when_the_allocation_is_uniform():
    _, quantizer, *_ = quantize("vit", allocation="uniform", uniform_fallback=True)
    assert quantizer.uniform_check is None and "uniform_check" not in quantizer.timings


def test_uniform_fallback_must_be_a_bool():
    with pytest.raises(ValueError, match="uniform_fallback must be True or False"):
        LRPQConfig(mixed_precision=True, uniform_fallback="yes")


@pytest.mark.parametrize(("allocation_kl", "uniform_kl", "expected"), [
    (0.12, 0.06, True),   # uniform clearly closer (the real-weight DeiT at W6A6)
    (0.99, 0.94, False),  # within the calibration images' noise (the real-weight DeiT at W4A4)
    (0.10, 0.20, False),  # the allocation closer
    (0.0, 0.0, False),    # both exact: keep the allocation
])
def test_fallback_needs_uniform_clearly_closer(allocation_kl, uniform_kl, expected):
    assert prefers_uniform({"allocation": allocation_kl, "uniform": uniform_kl}) is expected


def test_fallback_ratio_by_budget():
    assert uniform_fallback_ratio(4, 4) == uniform_fallback_ratio(6, 4) == UNIFORM_FALLBACK_RATIO
    assert uniform_fallback_ratio(6, 6) == uniform_fallback_ratio(8, 6) == 1.0
    check = {"allocation": 0.0245, "uniform": 0.0225}  # DINOv2-S W6A6, draw 2 (ratio 0.92): uniform won on test
    assert not prefers_uniform(check) and prefers_uniform(check, uniform_fallback_ratio(6, 6))
