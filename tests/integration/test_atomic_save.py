"""LRPQuantizer.save and the quantized model's save_pretrained write atomically: no partial model is left."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny_models import build, logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.integration import atomic


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

    def interrupted(model, directory, **kwargs):
        with open(f"{directory}/config.json", "w") as f:  # half-written output, then Ctrl-C
            f.write("{")
        raise KeyboardInterrupt

    # transformers' own save (which the lrpq save wraps) is what gets interrupted
    monkeypatch.setattr(type(model), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantizer.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "bare")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized with lrpq"):
        LRPQuantizer().save(build("vit"), tmp_path / "out")


def test_bare_save_pretrained_merges_into_an_existing_directory(quantized, tmp_path):
    _, model = quantized
    out = tmp_path / "out"
    out.mkdir()
    (out / "preprocessor_config.json").write_text("{}")  # e.g. processor.save_pretrained(out) done first
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier save")
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert "import optimum_lrpq" in (out / "README.md").read_text()
    loaded = AutoModelForImageClassification.from_pretrained(out, disable_mmap=True).eval()
    assert torch.equal(logits(loaded, pixels(2)), logits(model, pixels(2)))


def test_a_hand_written_readme_is_kept(quantized, tmp_path):
    _, model = quantized
    (tmp_path / "README.md").write_text("# my own card")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card"


def test_interrupted_resave_never_loads_as_a_mixed_model(tmp_path, monkeypatch):
    first = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        build("vit"), pixels(4), show_progress=False)
    second = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(
        build("vit", seed=1), pixels(4), show_progress=False)
    out = tmp_path / "out"
    first.save_pretrained(out)
    expected = logits(first, pixels(2))

    monkeypatch.setattr(type(second), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(out)  # interrupted while writing: the old model is untouched
    monkeypatch.undo()
    loaded = AutoModelForImageClassification.from_pretrained(out, disable_mmap=True).eval()
    assert torch.equal(logits(loaded, pixels(2)), expected)

    real_replace, moved = os.replace, []

    def interrupted_replace(source, destination):
        if moved:  # interrupted after the first file was moved in
            raise KeyboardInterrupt
        moved.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(out)
    monkeypatch.undo()
    assert not (out / "config.json").exists()  # mid-move: the directory no longer loads as a model at all
    with pytest.raises((OSError, ValueError), match="config.json|model_type"):
        AutoModelForImageClassification.from_pretrained(out)
    second.save_pretrained(out)
    loaded = AutoModelForImageClassification.from_pretrained(out, disable_mmap=True).eval()
    assert torch.equal(logits(loaded, pixels(2)), logits(second, pixels(2)))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_loaded_and_copied_models_keep_the_card_writing_save(quantized, tmp_path):
    _, model = quantized
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "a")
    copied = copy.deepcopy(loaded)
    assert copied.save_pretrained.__self__ is copied
    copied.save_pretrained(tmp_path / "b")
    card = (tmp_path / "b" / "README.md").read_text()
    assert "import optimum_lrpq" in card
