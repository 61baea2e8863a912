"""Quantizing at load time: `from_pretrained(float_dir, quantization_config=LRPQConfig(calibration_dataset=...))`."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from hub_server import run_with_hub
from local_files import make_dataset_dir, make_image_folder, make_model_dir, single_thread  # noqa: F401
from tiny_models import logits, pixels
from transformers import AutoModelForImageClassification

from optimum_lrpq import LRPQConfig
from optimum_lrpq.data.loading import DatasetLoadError, load_calibration_dataset, materialize
from optimum_lrpq.nn import PackedWeightLayer


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("otf") / "float")


@pytest.mark.parametrize("kind", ["imagefolder", "save_to_disk"])
def test_quantize_while_loading_then_save_and_reload_bit_identical(float_dir, tmp_path, kind):
    data = make_image_folder(tmp_path / "images") if kind == "imagefolder" else make_dataset_dir(tmp_path / "saved")
    config = LRPQConfig(weight_bits=4, activation_bits=6, mixed_precision=kind == "save_to_disk",
                        calibration_dataset=str(data), calibration_split="train", num_calibration_samples=8)
    model = AutoModelForImageClassification.from_pretrained(float_dir, quantization_config=config)

    assert model.is_quantized and type(model.hf_quantizer).__name__ == "LRPQHfQuantizer"
    assert model.hf_quantizer.pre_quantized  # saving it writes a pre-quantized checkpoint
    assert {"lrpq", "quantization", "vision"} <= set(model.model_tags)  # push_to_hub's card gets them
    assert any(isinstance(m, PackedWeightLayer) for m in model.modules())
    qc = model.config.quantization_config
    assert qc.layer_bits and qc.calibration_dataset == str(data)
    assert (qc.relevance is not None) == (kind == "save_to_disk")
    json.loads(model.config.to_json_string())  # JSON-serializable, dataset given by path
    x = pixels(3, seed=5)
    expected = logits(model.eval(), x)
    float_model = AutoModelForImageClassification.from_pretrained(float_dir).eval()
    assert not torch.equal(expected, logits(float_model, x))  # really quantized

    model.save_pretrained(tmp_path / "quantized")
    saved = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert saved["layer_bits"] == qc.layer_bits
    reloaded, info = AutoModelForImageClassification.from_pretrained(tmp_path / "quantized", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(reloaded.eval(), x), expected)
    assert "lrpq" in reloaded.model_tags


def test_missing_split_lists_the_splits(float_dir, tmp_path):
    data = make_dataset_dir(tmp_path / "saved")
    config = LRPQConfig(calibration_dataset=str(data), calibration_split="test", num_calibration_samples=4)
    with pytest.raises(ValueError, match=r"no split 'test'; available splits: train, validation"):
        AutoModelForImageClassification.from_pretrained(float_dir, quantization_config=config)


def test_missing_local_directory_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DatasetLoadError, match="No such directory: .*missing"):
        load_calibration_dataset(str(tmp_path / "missing"), "train", 4)


def test_streamed_examples_are_materialized_with_their_features(tmp_path):
    saved = datasets.load_from_disk(str(make_dataset_dir(tmp_path / "saved")))["train"]
    streamed = saved.to_iterable_dataset().take(5)
    dataset = materialize(streamed)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 5
    assert dataset.features == saved.features and dataset.column_names == ["image", "label"]


HUB_CODE = r"""
import json, torch
torch.set_num_threads(1)
from transformers import AutoModelForImageClassification
from optimum_lrpq import LRPQConfig
from optimum_lrpq.cli import main

config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True, calibration_dataset="me/tiny-images",
                    calibration_split="train", num_calibration_samples=4)
model = AutoModelForImageClassification.from_pretrained("me/tiny-vit", quantization_config=config)
assert model.is_quantized and model.config.quantization_config.relevance
json.loads(model.config.to_json_string())
model.save_pretrained({out!r})
print("QUANTIZED", model.name_or_path)
status = main(["evaluate", {out!r}, "--dataset", "me/tiny-images", "--limit", "5", "--baseline", "me/tiny-vit"])
assert status == 0, status
"""


def test_quantize_while_loading_from_the_hub_with_a_hub_dataset(float_dir, hub_server, tmp_path):
    """Model, image processor and streamed calibration images all come from a Hub (the loopback one)."""
    shutil.copytree(float_dir, hub_server.repo_dir("me/tiny-vit"))
    saved = datasets.load_from_disk(str(make_dataset_dir(tmp_path / "saved")))
    for split in saved:
        target = hub_server.repo_dir("me/tiny-images", "dataset") / "data" / f"{split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        saved[split].to_parquet(str(target))
    out = str(tmp_path / "quantized")
    proc = run_with_hub(hub_server, HUB_CODE.format(out=out), tmp_path)
    assert "QUANTIZED me/tiny-vit" in proc.stdout
    assert "5 images of me/tiny-images (validation)" in proc.stdout and "me/tiny-vit (baseline)" in proc.stdout
    assert not hub_server.unhandled, hub_server.unhandled
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.config.quantization_config.calibration_dataset == "me/tiny-images"
