"""LRPQuantizer.save writes atomically: an interrupted save leaves no partial model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer


@pytest.fixture(scope="module")
def quantized():
    quantizer = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4))
    return quantizer, quantizer.quantize_model(build("vit"), pixels(4), show_progress=False)


def test_save_then_load(quantized, tmp_path):
    quantizer, model = quantized
    quantizer.save(model, tmp_path / "out")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out", disable_mmap=True).eval()
    assert torch.equal(logits(loaded, pixels(2)), logits(model, pixels(2)))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    card = (tmp_path / "out" / "README.md").read_text()
    assert "import optimum_lrpq" in card and "lrpq" in card


def test_existing_directory_needs_overwrite(quantized, tmp_path):
    quantizer, model = quantized
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        quantizer.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    quantizer.save(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_interrupted_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    quantizer, model = quantized

    def interrupted(directory, **kwargs):
        with open(f"{directory}/config.json", "w") as f:  # half-written output, then Ctrl-C
            f.write("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantizer.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized with lrpq"):
        LRPQuantizer().save(build("vit"), tmp_path / "out")
