"""Block reconstruction (`LRPQConfig(reconstruction="block")`, `pipeline.reconstruction`)."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import MODEL_NAMES, build, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import PackedWeightLayer, is_quantized_module
from optimum_lrpq.pipeline import reconstruction


def _quantize(name="vit", images=8, **options):
    config = LRPQConfig(weight_bits=4, activation_bits=4, reconstruction="block", **options)
    return LRPQuantizer(config).quantize_model(build(name), pixels(images), show_progress=False)


@pytest.fixture
def block_errors(monkeypatch):
    """The (before, after) output errors `_learn_block` reports, block by block."""
    errors = []
    learn = reconstruction._learn_block

    def spy(*args, **kwargs):
        result = learn(*args, **kwargs)
        errors.append(result[:2])
        return result

    monkeypatch.setattr(reconstruction, "_learn_block", spy)
    return errors


def test_reconstruction_lowers_each_block_output_error(block_errors):
    _quantize(images=16, reconstruction_steps=25)
    assert len(block_errors) == 2  # the tiny ViT's blocks
    assert all(after <= before for before, after in block_errors)
    assert any(after < 0.97 * before for before, after in block_errors), block_errors


def test_never_worse_than_nearest_rounding(block_errors, monkeypatch):
    monkeypatch.setattr(reconstruction, "STEP_LR", 5.0)  # learning that wrecks the steps
    monkeypatch.setattr(reconstruction, "ROUNDING_LR", 50.0)
    _quantize(reconstruction_steps=6)
    assert block_errors and all(after <= before for before, after in block_errors)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_round_trips(name, tmp_path):
    model = _quantize(name, reconstruction_steps=2)
    assert all(m.is_frozen for m in model.modules() if isinstance(m, PackedWeightLayer))
    x = pixels(3, seed=7)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)


def test_deterministic_for_a_seed():
    first, second = (_quantize(reconstruction_steps=3).state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_one_calibration_image_is_refused():
    with pytest.raises(ValueError, match="at least 2 calibration images"):
        _quantize(images=1)


@pytest.mark.parametrize("field, value, message", [
    ("reconstruction", "layer", "reconstruction must be one of"),
    ("reconstruction_steps", 0, "reconstruction_steps must be a positive integer"),
    ("reconstruction_batch_size", 2.5, "reconstruction_batch_size must be a positive integer"),
    ("reconstruction_drop", 1.5, r"reconstruction_drop must be a number in \[0, 1\]"),
])
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LRPQConfig(**{field: value})


def test_interrupted_reconstruction_leaves_the_model_unchanged(monkeypatch):
    model = build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reconstruction, "_learn_block", interrupt)
    with pytest.raises(KeyboardInterrupt):
        LRPQuantizer(LRPQConfig(reconstruction="block")).quantize_model(model, pixels(8), show_progress=False)
    assert not any(is_quantized_module(m) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_constant_block_output_is_rounded_to_nearest_with_a_warning(caplog):
    model = build("vit")
    with torch.no_grad():  # every token the same vector: each block's output is constant
        model.vit.embeddings.patch_embeddings.projection.weight.zero_()
        model.vit.embeddings.patch_embeddings.projection.bias.fill_(0.5)
        model.vit.embeddings.position_embeddings.zero_()
        model.vit.embeddings.cls_token.fill_(0.5)
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        LRPQuantizer(LRPQConfig(reconstruction="block", reconstruction_steps=3)).quantize_model(
            model, pixels(8), show_progress=False)
    assert "output is constant on the calibration images" in caplog.text


def test_sensitivity_allocation_reconstructs_only_the_final_model(block_errors):
    model = _quantize(mixed_precision=True, allocation="sensitivity", num_sensitivity_samples=2,
                      reconstruction_steps=2)
    assert len(block_errors) == 2  # the final calibration only, not every sensitivity measurement
    assert model.config.quantization_config.layer_bits


def test_blocks_kept_float_are_skipped(block_errors):
    model = _quantize(modules_to_not_convert=["vit.layers.0"], reconstruction_steps=2)
    assert len(block_errors) == 1
    assert not any(isinstance(m, PackedWeightLayer) for m in model.vit.layers[0].modules())


def test_a_block_with_a_per_image_argument_is_refused():
    class Gate(torch.nn.Module):
        def forward(self, hidden, mask):
            return hidden * mask

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Gate()

        def forward(self, pixel_values):
            return self.block(pixel_values, torch.ones_like(pixel_values))

    toy = Toy()
    with pytest.raises(NotImplementedError, match="per-image tensor argument. Set reconstruction=None"):
        reconstruction._capture(toy, toy.block, [torch.ones(2, 3)], with_output=False)
