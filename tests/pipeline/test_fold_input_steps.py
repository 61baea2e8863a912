"""`input_step_levels`: the per-channel input steps of o_proj / fc2 split into a power-of-two level (kept in the
product) and a residual multiplied into the stored weight columns, so the layer is one integer GEMM per level; the
option's defaults, the stored weights, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from local_files import as_older_format
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.configuration import DEFAULT_INPUT_STEP_LEVELS, EIGHT_BIT_WEIGHT_INPUT_STEP_LEVELS, FORMAT_VERSION
from optimum_lrpq.kernels.reference import dequantize_weight
from optimum_lrpq.nn import QuantLinear, set_kernel_backend
from optimum_lrpq.pipeline.calibration import MIN_ROWS_PER_CHANNEL
from optimum_lrpq.quantization import packing, uniform
from optimum_lrpq.quantization.ranges import estimate_range
from optimum_lrpq.quantization.step_groups import group_steps

# The tiny ViT has 17 tokens per image: enough images for a range per channel.
ENOUGH_IMAGES = -(-MIN_ROWS_PER_CHANNEL // 17)
FOLDED = ("vit.layers.0.attention.o_proj", "vit.layers.1.attention.o_proj", "vit.layers.0.mlp.fc2", "vit.layers.1.mlp.fc2")


def quantize(**options):
    calibration = pixels(ENOUGH_IMAGES)
    options = {"weight_bits": 4, "activation_bits": 4, "mixed_precision": False, **options}
    config = LRPQConfig(num_calibration_samples=len(calibration), **options)
    return LRPQuantizer(config).quantize_model(build("vit"), calibration, show_progress=False)


def test_default_folds_and_format_2_checkpoints_do_not():
    assert FORMAT_VERSION >= 3
    assert LRPQConfig().input_step_levels == DEFAULT_INPUT_STEP_LEVELS > 0
    assert LRPQConfig(format_version=2).input_step_levels == 0
    assert LRPQConfig(format_version=2, input_step_levels=2).input_step_levels == 2
    for bad in (-1, True, 1.5, "4"):
        with pytest.raises(ValueError, match=r"input_step_levels must be 0 \(steps stay in the activation grid\) or a "
                                             r"positive number of power-of-two levels, got"):
            LRPQConfig(input_step_levels=bad)


def test_eight_bit_weights_fold_the_whole_ratio_and_checkpoints_keep_their_levels(tmp_path):
    # 8-bit weight columns absorb the whole step ratio: o_proj / fc2 become one GEMM each
    assert LRPQConfig(weight_bits=8, activation_bits=8).input_step_levels == EIGHT_BIT_WEIGHT_INPUT_STEP_LEVELS == 1
    assert LRPQConfig(weight_bits=6, activation_bits=8).input_step_levels == DEFAULT_INPUT_STEP_LEVELS
    assert LRPQConfig(weight_bits=8, activation_bits=8, input_step_levels=4).input_step_levels == 4
    model = quantize(weight_bits=8, activation_bits=8, weight_rounding="nearest")
    assert folded_layers(model) == dict.fromkeys(FOLDED, 1)  # (an 8-bit head input keeps one step)
    # a checkpoint made with 4 levels at 8-bit weights (before this default) is read with its 4 levels
    older = quantize(weight_bits=8, activation_bits=8, weight_rounding="nearest", input_step_levels=4)
    older.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["input_step_levels"] == 4
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert folded_layers(loaded) == dict.fromkeys(FOLDED, 4)
    x = pixels(3, seed=5)
    assert torch.equal(logits(loaded, x), logits(older, x))


def folded_layers(model) -> dict[str, int]:
    return {name: m.input_step_levels for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.input_step_levels is not None}


def test_only_per_channel_linears_fold():
    model = quantize(weight_rounding="nearest")
    assert folded_layers(model) == dict.fromkeys((*FOLDED, "classifier"), DEFAULT_INPUT_STEP_LEVELS)
    assert f"input_step_levels={DEFAULT_INPUT_STEP_LEVELS}" in repr(model.get_submodule(FOLDED[0]))
    assert folded_layers(quantize(weight_rounding="nearest", linear_input_granularity="per_tensor")) == {
        "classifier": DEFAULT_INPUT_STEP_LEVELS}
    assert folded_layers(quantize(weight_rounding="nearest", linear_input_granularity="per_tensor",
                                  head_input_granularity="per_tensor")) == {}
    assert folded_layers(quantize(weight_rounding="nearest", input_step_levels=0)) == {}


@pytest.mark.parametrize("levels", [1, 2, 8])
def test_stored_weight_is_the_float_weight_times_the_step_residuals_rounded_per_row(levels):
    """Round to nearest: the codes are exactly those of W·diag(s / level) on its own per-row min/max grid."""
    float_fc2 = build("vit").get_submodule("vit.layers.1.mlp.fc2").weight.detach()
    layer = quantize(weight_rounding="nearest", input_step_levels=levels).get_submodule("vit.layers.1.mlp.fc2")
    steps = layer.input_quant.scale
    assert steps.unique().numel() > levels  # a real per-channel grid, more steps than levels
    level = group_steps(steps, levels)
    assert torch.equal(layer.input_product_step(), level) and level.unique().numel() <= levels
    residual = steps / level
    assert bool((residual <= 1).all()) and bool((residual[level > level.min()] > 0.5).all())
    folded = float_fc2 * residual
    scale, zero_point = estimate_range(folded, 4, channel_axis=0, method="minmax")
    expected = uniform.quantize(folded, scale, zero_point, 4)
    codes = packing.unpack(layer.codes(), 4, layer.in_features).float()  # qweight: a placeholder once released
    assert torch.equal(codes, expected)
    torch.testing.assert_close(layer.weight_scale, scale.reshape(-1))
    # `.weight` is the float weight the layer stands for: the stored one divided back by the residuals
    torch.testing.assert_close(layer.weight * residual, dequantize_weight(layer.packed_weight(), torch.float32))


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_folded_layer_multiplies_unit_step_codes(rounding):
    """y = W' ((x_int - z) * level) + b on the reference backend: the same function as the unfolded fake-quantized
    product with the effective weight W' / residual (to float rounding)."""
    model = quantize(weight_rounding=rounding)
    set_kernel_backend(model, "reference")
    layer = model.get_submodule("vit.layers.0.mlp.fc2")
    quant = layer.input_quant
    x = torch.randn(3, 17, layer.in_features) * 2
    codes = uniform.quantize(x, quant.scale, quant.zero_point, quant.bits)
    folded_weight = dequantize_weight(layer.packed_weight(), torch.float32)
    with torch.no_grad():
        y = layer(x)
        level = layer.input_product_step()
        assert torch.equal(y, F.linear((codes - quant.zero_point) * level, folded_weight, layer.bias))
        unfolded = F.linear(uniform.fake_quantize(x, quant.scale, quant.zero_point, quant.bits), layer.weight,
                            layer.bias)
    torch.testing.assert_close(y, unfolded, rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_fold_keeps_accuracy_against_the_float_model():
    """Folded and unfolded W8A8 models are all close to the float model (the fold changes what is rounded)."""
    x = pixels(16, seed=5)
    expected = logits(build("vit"), x)
    span = (expected.max() - expected.min()).item()
    for levels in (0, 1, DEFAULT_INPUT_STEP_LEVELS):
        out = logits(quantize(weight_bits=8, activation_bits=8, input_step_levels=levels), x)
        assert (out - expected).abs().max().item() < 0.1 * span, levels


def test_folded_checkpoint_reloads_bit_identical(tmp_path):
    model = quantize()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["input_step_levels"] == DEFAULT_INPUT_STEP_LEVELS and saved["format_version"] == FORMAT_VERSION
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert folded_layers(loaded) == folded_layers(model)
    x = pixels(4, seed=7)
    for backend in ("reference", "auto"):
        set_kernel_backend(model, backend)
        set_kernel_backend(loaded, backend)
        assert torch.equal(logits(loaded, x), logits(model, x)), backend


def test_format_2_checkpoint_without_the_field_loads_unfolded(tmp_path):
    """Checkpoints written before the option existed (format 2) store the o_proj / fc2 weights unfolded."""
    model = quantize(input_step_levels=0)
    model.save_pretrained(tmp_path)
    as_older_format(tmp_path, 2, "input_step_levels")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.input_step_levels == 0
    assert folded_layers(loaded) == {}
    x = pixels(4, seed=7)
    assert torch.equal(logits(loaded, x), logits(model, x))
