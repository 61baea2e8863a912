"""What a user hits on first use of `optimum-lrpq` (issue 16): the bare command, start-up time, `quantize --config`
and its flags, `--quiet`, `--device`, class names that are not the model's labels, mistyped local paths, and a failed
upload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from local_files import make_dataset_dir, make_model_dir, single_thread  # noqa: F401
from test_cli import leftovers, run_error

from optimum_lrpq import __version__, cli
from optimum_lrpq.cli import app

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-use")
    return {"model": str(make_model_dir(root / "float")), "data": str(make_dataset_dir(root / "data")), "root": root}


def saved_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


# ---------------------------------------------------------------------------------------------------------------------
# bare command, start-up
# ---------------------------------------------------------------------------------------------------------------------


def test_bare_command_prints_the_help_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    # argparse wraps the usage line at the terminal width
    assert " ".join(out.split()).startswith("usage: optimum-lrpq [-h] [--version] {quantize,evaluate,inspect,export,"
                                            "demo} ...")
    assert "Start with 'optimum-lrpq demo'" in out
    assert list(tmp_path.iterdir()) == []  # the demo would have written ./lrpq-demo


def test_options_without_a_command_are_an_error_not_the_demo(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "optimum-lrpq: error: --output is an option of a command, not of optimum-lrpq itself: put it after the "
        "command, e.g. 'optimum-lrpq demo --output ...' (commands: quantize, evaluate, inspect, export, demo)")
    assert not (tmp_path / "out").exists()


STARTUP = """
import json, sys
from optimum_lrpq.cli import app
for argv in (["--help"], ["--version"], ["quantize", "--help"], ["evaluate", "--help"]):
    try:
        app.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
print(json.dumps(sorted(m for m in ("torch", "transformers", "datasets", "numpy", "PIL") if m in sys.modules)),
      file=sys.stderr)
"""


def test_help_and_version_import_no_heavy_library():
    """`--help` / `--version` build every parser without importing torch, transformers or datasets (they took ~3-6 s
    of imports before)."""
    proc = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    assert f"optimum-lrpq {__version__}\n" in proc.stdout and "usage: optimum-lrpq quantize" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# quantize --config FILE and the flags
# ---------------------------------------------------------------------------------------------------------------------


def write_config(tmp_path, fields, name="lrpq.json"):
    path = tmp_path / name
    path.write_text(fields if isinstance(fields, str) else json.dumps(fields))
    return str(path)


def test_flags_override_the_config_file(local, tmp_path):
    config = write_config(tmp_path, {"weight_bits": 3, "activation_bits": 6, "allocation": "uniform",
                                     "weight_rounding": "nearest", "calibration_batch_size": 2,
                                     "num_calibration_samples": 4, "clipping": "ccq_b", "quant_method": "lrpq"})
    out = tmp_path / "out"
    assert cli.main(["quantize", local["model"], "--dataset", local["data"], "--config", config,
                     "--weight-bits", "5", "--weight-rounding", "gptq", "--output", str(out), "--quiet"]) == 0
    saved = saved_config(out)
    assert (saved["weight_bits"], saved["weight_rounding"]) == (5, "gptq")  # flags
    assert (saved["activation_bits"], saved["allocation"], saved["calibration_batch_size"], saved["clipping"],
            saved["num_calibration_samples"]) == (6, "uniform", 2, "ccq_b", 4)  # the file
    assert {e["weight"] for e in saved["layer_bits"].values() if "weight" in e} == {5}


def test_common_flags_reach_the_config(local, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4",
                     "--mixed-precision", "--no-uniform-fallback", "--allocation", "magnitude",
                     "--weight-rounding", "nearest", "--reconstruction", "block", "--reconstruction-steps", "2",
                     "--calibration-batch-size", "3", "--device", "cpu", "--output", str(out), "--quiet"]) == 0
    saved = saved_config(out)
    assert (saved["mixed_precision"], saved["allocation"], saved["weight_rounding"], saved["calibration_batch_size"],
            saved["num_calibration_samples"]) == (True, "magnitude", "nearest", 3, 4)
    assert (saved["reconstruction"], saved["reconstruction_steps"], saved["uniform_fallback"]) == ("block", 2, False)
    assert saved["relevance"] is None  # the magnitude baseline computes no relevance


def test_config_file_names_the_calibration_dataset(local, tmp_path, capsys):
    config = write_config(tmp_path, {"calibration_dataset": local["data"], "calibration_split": "validation",
                                     "num_calibration_samples": 4})
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["quantize", local["model"], "--config", config, "--output", str(out), "--quiet"]) == 0
    assert f"4 images of {local['data']} (validation)" in capsys.readouterr().out


def test_allocation_choices_are_checked_by_the_parser(local, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", local["model"], "--allocation", "knapsack", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "argument --allocation: invalid choice: 'knapsack'" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ({"weight_bit": 4}, "unknown field 'weight_bit' (did you mean 'weight_bits'?); LRPQConfig fields: weight_bits, "),
    ({"frobnicate": True}, "unknown field 'frobnicate'; LRPQConfig fields: weight_bits, activation_bits"),
    ({"allocation": "greedy"}, ("allocation must be one of ['lrp', 'lrp_sensitivity', 'sensitivity', 'uniform', "
                                "'random', 'magnitude'], got 'greedy'.")),
    ({"weight_bits": "4"}, "weight_bits must be an integer between 2 and 8, got '4' (str)."),
    ({"layer_bits": {}}, "field 'layer_bits' is written by the quantizer, not a setting; remove it."),
    ({"quant_method": "gptq"}, "quant_method is 'gptq'; this file must describe an 'lrpq' quantization"),
    ("{weight_bits: 4}", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)."),
    ("[4, 4]", "expected a JSON object of LRPQConfig fields"),
], ids=["typo", "unknown", "bad-choice", "bad-type", "recorded", "other-method", "bad-json", "not-an-object"])
def test_config_file_errors_name_the_field(local, tmp_path, capsys, content, message):
    config = write_config(tmp_path, content)
    out = tmp_path / "out"
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--config", config,
                              "--output", str(out)])
    assert line.startswith(f"optimum-lrpq: error: --config {config}: ")
    assert message in line
    assert not out.exists() and not leftovers(tmp_path)


def test_missing_config_file(local, tmp_path, capsys):
    line = run_error(capsys, ["quantize", local["model"], "--config", str(tmp_path / "nope.json"),
                              "--output", str(tmp_path / "o")])
    assert line == f"optimum-lrpq: error: --config {tmp_path / 'nope.json'}: no such file."


def test_a_bad_flag_value_names_the_field(local, tmp_path, capsys):
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--calibration-batch-size", "0",
                              "--output", str(tmp_path / "o")])
    assert line == "optimum-lrpq: error: --calibration-batch-size must be at least 1."


# ---------------------------------------------------------------------------------------------------------------------
# --quiet, TQDM_DISABLE
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_stderr(local, capsys, *extra) -> str:
    capsys.readouterr()
    assert cli.main(["evaluate", local["model"], "--dataset", local["data"], "--limit", "4", *extra]) == 0
    return capsys.readouterr().err


def test_quiet_and_tqdm_disable_turn_the_progress_bars_off(local, capsys, monkeypatch):
    import transformers.utils.logging

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert "Evaluating" in evaluate_stderr(local, capsys)  # the bar of the evaluation loop
    assert "Evaluating" not in evaluate_stderr(local, capsys, "--quiet")
    assert transformers.utils.logging.is_progress_bar_enabled()  # the libraries' setting is restored afterwards
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert "Evaluating" not in evaluate_stderr(local, capsys)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert "Evaluating" in evaluate_stderr(local, capsys)


# ---------------------------------------------------------------------------------------------------------------------
# --device
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_only_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    return torch


def test_cuda_on_a_cpu_only_torch_is_a_one_line_error(local, tmp_path, capsys, cpu_only_torch):
    version = cpu_only_torch.__version__
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--device", "cuda"])
    assert line == (f"optimum-lrpq: error: --device cuda: this torch ({version}) is built without CUDA; available "
                    "devices: cpu. Use --device cpu, or install a CUDA build of torch.")
    out = tmp_path / "out"
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--device", "cuda:0",
                              "--output", str(out)])
    assert "--device cuda:0: this torch" in line and not out.exists()
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--device", "mps"])
    assert line == (f"optimum-lrpq: error: --device mps: no mps device is visible to this torch ({version}); "
                    "available devices: cpu.")


def test_missing_gpu_index_and_bad_device_name(local, capsys, cpu_only_torch, monkeypatch):
    monkeypatch.setattr(cpu_only_torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpu_only_torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_only_torch.cuda, "device_count", lambda: 1)
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--device", "cuda:3"])
    assert line == ("optimum-lrpq: error: --device cuda:3: there is no cuda device 3; available devices: cpu, "
                    "cuda:0.")
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--device", "gpu"])
    assert line == ("optimum-lrpq: error: --device gpu: not a device name (e.g. cpu, cuda, cuda:1, mps); available "
                    "devices: cpu, cuda:0.")


# ---------------------------------------------------------------------------------------------------------------------
# class names vs the model's labels (the demo model's labels are "0".."9")
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """Three shipped test digits per class as two image folders: classes named "0".."9", and "zero".."nine"."""
    from optimum_lrpq.demo import load_digits

    test = load_digits()["test"]
    chosen = [i for digit in range(10) for i in [j for j, label in enumerate(test["label"]) if label == digit][:3]]
    root = tmp_path_factory.mktemp("digits")
    for names, folder in ((list(map(str, range(10))), "digits"), (WORDS, "words")):
        for i in chosen:
            directory = root / folder / names[test[i]["label"]]
            directory.mkdir(parents=True, exist_ok=True)
            test[i]["image"].save(directory / f"{i}.png")
    return root


def top1(out: str) -> float:
    """The top-1 column of the last table row (`demo MNIST ViT  96.67%  ...`)."""
    row = out.strip().splitlines()[-1]
    assert row.startswith("demo MNIST ViT "), out
    return float(row.split()[3].rstrip("%"))


def test_class_folders_named_like_the_labels_are_evaluated(digit_folders, capsys):
    capsys.readouterr()
    assert cli.main(["evaluate", "--dataset", str(digit_folders / "digits"), "--quiet"]) == 0
    assert top1(capsys.readouterr().out) > 85.0  # the demo model, ~96 % on digits


def test_class_folders_not_named_like_the_labels_are_refused(digit_folders, capsys):
    line = run_error(capsys, ["evaluate", "--dataset", str(digit_folders / "words"), "--quiet"])
    assert line.startswith(
        "optimum-lrpq: error: The dataset's class names do not match the model's labels (id2label): 10 of the "
        "dataset's 10 classes ('eight', 'five', 'four', 'nine', 'one', 'seven' and 4 more) are not among the model's "
        "10 labels ('0', '1', '2', '3', '4', '5' and 4 more)")
    assert line.endswith("Rename the dataset's classes to the model's labels (for an image folder: its class "
                         "folders), or pass --ignore-label-names if the dataset's label ids already are the model's "
                         "ids (e.g. ImageNet synset folders in the standard order).")


def test_ignore_label_names_compares_the_ids(digit_folders, capsys):
    capsys.readouterr()
    assert cli.main(["evaluate", "--dataset", str(digit_folders / "words"), "--ignore-label-names", "--quiet"]) == 0
    assert top1(capsys.readouterr().out) < 50.0  # alphabetical folder ids are not the digits: what the check prevents


def test_quantize_with_relevance_at_mismatched_labels_is_refused(digit_folders, tmp_path, capsys):
    out = tmp_path / "out"
    line = run_error(capsys, ["quantize", "--dataset", str(digit_folders / "words"), "--mixed-precision",
                              "--relevance-target", "label", "--num-samples", "8", "--output", str(out), "-q"])
    assert "10 of the dataset's 10 classes ('eight', 'five'" in line and "--ignore-label-names" in line
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# mistyped local paths: an error at once, no Hub lookup
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub lookup of a dataset or model fails the test."""
    import datasets
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError(f"looked up on the Hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)


def test_mistyped_relative_dataset_path(local, tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", "data/nonexistent"])
    assert line == (f"optimum-lrpq: error: No such directory: 'data/nonexistent' ({tmp_path / 'data' / 'nonexistent'})."
                    " The dataset was read as a local path because the directory 'data' exists here; check the path "
                    "(a Hub dataset is named 'name' or 'owner/name').")
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", "mnist/train"])
    assert "No such directory: 'mnist/train'" in line and "'train' is the name of an image folder's split" in line


def test_mistyped_relative_model_path(local, tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for command in (["inspect", "models/vit-typo"], ["evaluate", "models/vit-typo", "--dataset", local["data"]]):
        line = run_error(capsys, command)
        assert line == (f"optimum-lrpq: error: No such directory: models/vit-typo ({tmp_path / 'models' / 'vit-typo'})."
                        " The model was read as a local path because the directory 'models' exists here; check the "
                        "path (a Hub model is named 'name' or 'owner/name').")


def test_local_path_rule():
    from optimum_lrpq.data.loading import local_path_reason

    assert local_path_reason("./x") == "it starts with '.'"
    assert local_path_reason("~/x") == "it starts with '~'"
    assert local_path_reason("a/b/c") == "it has more than one '/'"
    assert local_path_reason("data\\set") == "it contains a backslash"
    assert local_path_reason("C:x") == "it starts with a drive letter"
    assert local_path_reason("mnist/") == "it ends with '/'"
    assert local_path_reason("mnist/validation") == "'validation' is the name of an image folder's split directory"
    assert local_path_reason("mnist/validation", image_folder_splits=False) is None
    for hub_id in ("mnist", "ylecun/mnist", "facebook/deit-small-patch16-224"):
        assert local_path_reason(hub_id) is None


# ---------------------------------------------------------------------------------------------------------------------
# a failed upload
# ---------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_offline_keeps_the_output_and_says_how_to_upload_it(local, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4",
                              "--output", str(out), "--push-to-hub", "me/tiny", "--quiet"])
    assert line.startswith(f"optimum-lrpq: error: Saved {out}, but uploading it to me/tiny failed: Cannot reach ")
    assert line.endswith(f"HF_HUB_OFFLINE is set: unset it where the Hub is reachable, or upload the folder later "
                         f"with `hf upload me/tiny {out}`.")
    assert (out / "model.safetensors").exists()


def test_upload_failure_messages():
    from huggingface_hub.errors import LocalTokenNotFoundError

    from optimum_lrpq.integration.hub import upload_failure_message

    refused = upload_failure_message("d", "me/m", ConnectionRefusedError(111, "Connection refused"))
    assert refused == ("Saved d, but uploading it to me/m failed: [Errno 111] Connection refused. The Hugging Face Hub "
                       "is unreachable from here; upload the folder later with `hf upload me/m d`.")
    token = upload_failure_message("d", "me/m", LocalTokenNotFoundError("Token is required"))
    assert token.endswith("Log in with `hf auth login` (or set HF_TOKEN to a token with write access to me/m), then "
                          "upload the folder later with `hf upload me/m d`.")
    other = upload_failure_message("d", "me/m", RuntimeError("disk quota\nexceeded."))
    assert other == "Saved d, but uploading it to me/m failed: disk quota exceeded. Upload the folder later with " \
                    "`hf upload me/m d`."


def test_help_of_the_new_options(capsys):
    with pytest.raises(SystemExit):
        app.main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--config FILE", "--allocation {lrp,lrp_sensitivity,sensitivity,uniform,random,magnitude}",
                   "--weight-rounding {nearest,gptq}", "--calibration-batch-size N", "--device DEVICE", "--quiet",
                   "--ignore-label-names"):
        assert option in out, option
