"""Mix-QViT sensitivity: one allocation unit quantized at a time, and the allocations that use it."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build, logits, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.models import get_adapter
from optimum_lrpq.nn import LogQuantizer, PackedWeightLayer, QuantLayerNorm, UniformQuantizer
from optimum_lrpq.pipeline.calibration_data import CalibrationSet
from optimum_lrpq.pipeline.conversion import plan_layer_bits
from optimum_lrpq.pipeline.mixed_precision import choose_layer_bits, layer_macs
from optimum_lrpq.pipeline.sensitivity import (
    NON_FINITE_LOSS,
    logit_loss,
    measure_sensitivity,
    monotone_table,
)
from optimum_lrpq.pipeline.units import allocation_units, unit_layer_bits


def setup(name="vit", **options):
    model = build(name)
    layout = get_adapter(model).layout(model)
    config = LRPQConfig(**options)
    uniform = plan_layer_bits(layout, config)
    return model, layout, config, uniform, allocation_units(layout, uniform)


def test_unit_layer_bits_cover_the_unit_its_layernorm_and_attention():
    _, layout, _, uniform, units = setup()
    by_name = {u.name: u for u in units}
    qkv, fc1 = by_name["vit.layers.0.layernorm_before"], by_name["vit.layers.0.layernorm_after"]
    o_proj = by_name["vit.layers.0.attention.o_proj"]
    assert unit_layer_bits(qkv, layout, uniform, 3, 3) == {
        **{f"vit.layers.0.attention.{p}_proj": {"weight": 3, "activation": 3} for p in "qkv"},
        "vit.layers.0.layernorm_before": {"activation": 3},
        "vit.layers.0.attention": {"activation": 3},
    }
    assert unit_layer_bits(fc1, layout, uniform, 5, 5) == {
        "vit.layers.0.mlp.fc1": {"weight": 5, "activation": 5}, "vit.layers.0.layernorm_after": {"activation": 5}}
    assert unit_layer_bits(o_proj, layout, uniform, 4, 4) == {o_proj.name: {"weight": 4, "activation": 4}}


def test_logit_loss():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.equal(logit_loss(a, a, "kl"), torch.zeros(2, dtype=torch.float64))
    b = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    p, q = torch.softmax(a[0].double(), 0), torch.softmax(b[0].double(), 0)
    assert logit_loss(b, a, "kl")[0].item() == pytest.approx(float((p * (p / q).log()).sum()))
    assert logit_loss(b, a, "mse").tolist() == pytest.approx([8 / 3, 0.0])
    with pytest.raises(ValueError, match="sensitivity metric"):
        logit_loss(a, a, "top1")


def test_monotone_table():
    assert monotone_table({4: 0.5, 3: 1.0, 5: 0.7, 6: -1e-9}) == {3: 1.0, 4: 0.5, 5: 0.5, 6: 0.0}
    assert monotone_table({2: math.nan, 3: math.inf, 4: 2.0}) == {2: NON_FINITE_LOSS, 3: NON_FINITE_LOSS, 4: 2.0}


@pytest.mark.parametrize("name", ["vit", "swin", "deit_teacher", "dinov2"])
def test_measurement_leaves_the_model_unchanged_and_covers_every_unit(name):
    model, layout, config, uniform, units = setup(name)
    x = pixels(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, x)
    table = measure_sensitivity(model, layout, config, units, uniform, [x[:2], x[2:]], [2, 4, 8],
                                show_progress=False)
    assert list(table) == [u.name for u in units]
    for row in table.values():
        assert list(row) == [2, 4, 8]
        assert row[2] >= row[4] >= row[8] >= 0
    assert sum(row[2] for row in table.values()) > sum(row[8] for row in table.values())
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, (PackedWeightLayer, QuantLayerNorm, UniformQuantizer, LogQuantizer))
                   for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model, x), expected)


def test_one_unit_equals_the_pipeline_with_everything_else_left_in_float():
    """The measured loss is exactly that of LRPQuantizer quantizing only this unit (others not converted)."""
    model, layout, config, uniform, units = setup("vit")
    unit = units[0]  # q/k/v of block 0 with its LayerNorm and attention quantizers
    x = pixels(8)
    table = measure_sensitivity(model, layout, config, [unit], uniform, [x], [3], show_progress=False)
    kept = set(unit_layer_bits(unit, layout, uniform, 3, 3))
    others = [n for n in uniform if n not in kept]
    reference = logits(model, x)
    quantized = LRPQuantizer(LRPQConfig(weight_bits=3, activation_bits=3, modules_to_not_convert=others)
                             ).quantize_model(model, x, show_progress=False)
    assert set(quantized.config.quantization_config.layer_bits) == kept
    expected = logit_loss(logits(quantized, x), reference, "kl").mean().item()
    assert expected > 0
    # GPTQ solves a linear system from accumulated input moments: equal up to float32 rounding (~1e-6 relative).
    assert table[unit.name][3] == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_mse_metric():
    model, layout, config, uniform, units = setup("vit")
    x = pixels(4)
    kl = measure_sensitivity(model, layout, config, units[:2], uniform, [x], [3], show_progress=False)
    mse = measure_sensitivity(model, layout, config, units[:2], uniform, [x], [3], metric="mse",
                              show_progress=False)
    assert kl != mse and all(row[3] > 0 for row in mse.values())
    with pytest.raises(ValueError, match="sensitivity metric"):
        measure_sensitivity(model, layout, config, units, uniform, [x], [3], metric="top1", show_progress=False)


def _averages(model, layout, layer_bits):
    names = [n for n in layout.weight_layers() if n != layout.patch_embedding]
    macs = layer_macs(model, names, pixels(1))
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    w = sum(layer_bits[n]["weight"] * s for n, s in sizes.items()) / sum(sizes.values())
    a = sum(layer_bits[n]["activation"] * m for n, m in macs.items()) / sum(macs.values())
    return w, a


@pytest.mark.parametrize("allocation", ["lrp_sensitivity", "sensitivity"])
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_sensitivity_allocations_end_to_end(name, allocation):
    model = build(name)
    layout = get_adapter(model).layout(model)
    quantizer = LRPQuantizer(LRPQConfig(mixed_precision=True, allocation=allocation, num_sensitivity_samples=3,
                                        calibration_batch_size=2, uniform_fallback=False))
    quantizer.quantize_model(model, pixels(8), show_progress=False)
    bits = model.config.quantization_config.layer_bits
    w, a = _averages(model, layout, bits)
    assert w <= 4 + 1e-9 and a <= 4 + 1e-9
    units = allocation_units(layout, plan_layer_bits(layout, LRPQConfig()))
    assert list(quantizer.sensitivity) == [u.name for u in units]
    assert all(list(row) == [3, 4, 5, 6] for row in quantizer.sensitivity.values())
    assert "sensitivity" in quantizer.timings
    assert (quantizer.relevance is not None) == (allocation == "lrp_sensitivity")
    # measured on the first num_sensitivity_samples calibration images
    fresh = build(name)
    expected = measure_sensitivity(fresh, layout, LRPQConfig(), units, plan_layer_bits(layout, LRPQConfig()),
                                   [pixels(8)[:2], pixels(8)[2:3]], [3, 4, 5, 6], show_progress=False)
    for unit in units:
        assert quantizer.sensitivity[unit.name] == pytest.approx(expected[unit.name], rel=1e-6, abs=1e-12)


def test_sensitivity_allocation_follows_the_table():
    """A unit that is very sensitive at low widths gets the top width; the budget is paid by the others."""
    model, layout, _, uniform, units = setup("vit")
    config = LRPQConfig(mixed_precision=True, allocation="sensitivity", weight_bits=4, activation_bits=4)
    fc2 = next(u for u in units if u.name.endswith("layers.0.mlp.fc2"))
    table = {u.name: {3: 1e-3, 4: 5e-4, 5: 2.5e-4, 6: 1.25e-4} for u in units}
    table[fc2.name] = {3: 10.0, 4: 5.0, 5: 1.0, 6: 0.0}
    calibration = CalibrationSet([pixels(2)], None)
    bits = choose_layer_bits(model, layout, config, uniform, calibration, None, table)
    assert bits[fc2.name]["weight"] == 6
    w, a = _averages(model, layout, bits)
    assert w <= 4 + 1e-9 and a <= 4 + 1e-9
    with pytest.raises(ValueError, match="needs the measured sensitivity"):
        choose_layer_bits(model, layout, config, uniform, calibration, None, None)


@pytest.mark.parametrize(("field", "value"), [
    ("num_sensitivity_samples", 0), ("num_sensitivity_samples", 2.5), ("num_sensitivity_samples", True),
    ("sensitivity_metric", "top1"), ("sensitivity_weight", 0), ("sensitivity_weight", -1.0),
    ("sensitivity_weight", math.inf), ("sensitivity_weight", True), ("sensitivity_weight", "1"),
])
def test_sensitivity_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        LRPQConfig(**{field: value})


def test_sensitivity_fields_round_trip():
    config = LRPQConfig(mixed_precision=True, allocation="lrp_sensitivity", num_sensitivity_samples=4,
                        sensitivity_metric="mse", sensitivity_weight=2)
    again = LRPQConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert (again.allocation, again.num_sensitivity_samples, again.sensitivity_metric, again.sensitivity_weight) == (
        "lrp_sensitivity", 4, "mse", 2.0)


def test_no_batches_is_refused():
    model, layout, config, uniform, units = setup("vit")
    with pytest.raises(ValueError, match="needs at least one batch of images"):
        measure_sensitivity(model, layout, config, units[:1], uniform, [], [3], show_progress=False)
