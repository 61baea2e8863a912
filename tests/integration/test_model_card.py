"""The model card written for a quantized model: front matter, method, budget, bits table, accuracy, loading code."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import ModelCard
from local_files import single_thread  # noqa: F401
from tiny_models import build, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.integration.model_card import is_hub_id, render_model_card, write_model_card
from optimum_lrpq.pipeline import run
from optimum_lrpq.reporting.summary import bits_summary


@pytest.fixture(scope="module")
def qmodel():
    model = build("vit")
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True, uniform_fallback=False)
    return LRPQuantizer(config).quantize_model(model, pixels(8), show_progress=False)


def test_card_of_a_mixed_run_that_kept_uniform_bits(monkeypatch, caplog):
    # the allocation measured worse than uniform bits on the calibration images: the model is uniform, and says so
    monkeypatch.setattr(run, "compare_with_uniform", lambda *args: {"allocation": 0.2, "uniform": 0.1})
    with caplog.at_level(logging.WARNING, logger="optimum_lrpq"):
        model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True)).quantize_model(
            build("vit"), pixels(8), show_progress=False)
    assert "diverges more from the float model on the calibration images (mean KL of the logits 0.2) than " \
           "uniform W4A4 (0.1); keeping uniform bits" in caplog.text
    bits = model.config.quantization_config.layer_bits
    assert {(e.get("weight", 4), e["activation"]) for n, e in bits.items() if n.startswith("vit.layers")} == {(4, 4)}
    text = render_model_card(model)
    assert "(LRP-QViT W4/A4, uniform)" in text and "**4-bit** weights and **4-bit** activations in every layer" in text
    assert "mixed precision was asked for; the allocation kept the same bits in every layer" in text
    assert "distributed over the layers by LRP relevance" not in text


def test_card_content(qmodel, tmp_path):
    accuracy = {"quantized": 0.8125, "float": 0.84, "dataset": "imagenet-1k", "split": "validation", "num_images": 64}
    path = write_model_card(qmodel, tmp_path, base_model="google/vit-base-patch16-224", accuracy=accuracy,
                            repo_id="me/vit-lrpq", calibration="imagenet-1k (train)")
    assert path == str(tmp_path / "README.md")
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["lrpq", "quantization", "vision"]
    assert card.data.base_model == "google/vit-base-patch16-224"
    text = card.text
    assert "[google/vit-base-patch16-224](https://huggingface.co/google/vit-base-patch16-224)" in text
    assert "LRP-QViT" in text and "mixed precision" in text
    assert "average of **4 bits** per weight" in text and "**4 bits** per activation" in text
    assert "the first 32 images of imagenet-1k (train)" in text
    assert "| **this model** | **81.25%** |" in text and "| float (base model) | 84.00% |" in text
    assert "64 images of imagenet-1k (validation split)" in text and "2.75 points" in text
    assert "import optimum_lrpq" in text
    assert "log2 quantizers at 2-3 bits, log√2 ones at 4-6 bits and uniform ones at 7-8 bits" in text
    assert 'AutoModelForImageClassification.from_pretrained("me/vit-lrpq")' in text
    qc = qmodel.config.quantization_config
    for name, entry in qc.layer_bits.items():
        if "weight" in entry:
            assert f"| `{name}` | {entry['weight']} | {entry['activation']} | {qc.relevance[name]:.4f} |" in text
        else:
            assert f"| `{name}` | {entry['activation']} |" in text
    assert "lrpq_bits.png" not in text  # no plot in the folder: no image link


def test_local_base_model_stays_out_of_the_front_matter(qmodel, tmp_path):
    (tmp_path / "lrpq_bits.png").write_bytes(b"png")
    write_model_card(qmodel, tmp_path, base_model=str(tmp_path), accuracy=0.5)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and f"`{tmp_path}`" in card.text
    assert "Top-1 accuracy: **50.00%**." in card.text
    assert "![relevance and bits per layer](lrpq_bits.png)" in card.text
    assert 'from_pretrained("path/to/this/folder")' in card.text


def test_reloaded_model_card_lists_layers_in_model_order(qmodel, tmp_path):
    qmodel.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)  # config keys come back sorted
    text = render_model_card(reloaded)
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert rows.index("vit.embeddings.patch_embeddings.projection") < rows.index("vit.layers.0.attention.q_proj")
    assert rows.index("vit.layers.0.attention.q_proj") < rows.index("vit.layers.0.attention.k_proj")
    assert rows.index("vit.layers.1.mlp.fc2") < rows.index("classifier")


def test_bits_summary_respects_the_budget(qmodel):
    summary = bits_summary(qmodel)
    assert 2 <= summary["weight_bits"] <= 4 + 1e-9 and 2 <= summary["activation_bits"] <= 4 + 1e-9
    assert summary["quantized_weights"] > 0


def test_float_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not quantized with lrpq"):
        write_model_card(build("vit"), tmp_path)


@pytest.mark.parametrize("name,expected", [("facebook/deit-small-patch16-224", True), ("bert-base-uncased", True),
                                           ("./model", False), ("/abs/path/model", False), ("a b", False),
                                           ("optimum-lrpq demo ViT (MNIST)", False)])
def test_is_hub_id(name, expected):
    assert is_hub_id(name) is expected


def test_base_model_is_recorded_and_survives_reload(tmp_path):
    model = build("vit")
    model.config._name_or_path = "google/vit-base-patch16-224"  # what from_pretrained(hub_id) sets
    qmodel = LRPQuantizer(LRPQConfig(weight_bits=8, activation_bits=8)).quantize_model(model, pixels(4),
                                                                                        show_progress=False)
    assert qmodel.config.quantization_config.base_model == "google/vit-base-patch16-224"
    qmodel.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config.quantization_config.base_model == "google/vit-base-patch16-224"
    reloaded.save_pretrained(tmp_path / "again")  # its name_or_path is now the folder; the card still names the base
    card = ModelCard.load(tmp_path / "again" / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224"


def test_base_model_must_be_a_string():
    with pytest.raises(ValueError, match="base_model must be a Hub id or path"):
        LRPQConfig(base_model=42)
