"""The scripts in examples/, each on a tiny local model and a local image dataset; the offline accuracy metric."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import run_with_hub
from test_cli import make_dataset_dir, make_model_dir, single_thread  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"model": str(make_model_dir(root / "float")), "data": str(make_dataset_dir(root / "data")), "root": root}


def run_example(name: str, argv: list[str]) -> None:
    """Run examples/<name> in this process as `python examples/<name> argv...`."""
    old = sys.argv
    sys.argv = [str(EXAMPLES / name), *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = old


def test_accuracy_metric_works_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from optimum_lrpq.metrics import ACCURACY_PATH, load_accuracy

    metric = load_accuracy()
    metric.add_batch(predictions=[0, 1, 2, 3], references=[0, 1, 1, 3])
    assert metric.compute() == {"accuracy": 0.75}
    assert metric.compute(predictions=[1, 1], references=[1, 0], normalize=False) == {"accuracy": 1}
    assert metric.compute(predictions=[1, 1], references=[1, 0], sample_weight=[3, 1]) == {"accuracy": 0.75}
    assert Path(ACCURACY_PATH, "accuracy.py").is_file()


def test_quantize_and_evaluate(local, tmp_path, capsys):
    out = tmp_path / "quantized"
    run_example("quantize_and_evaluate.py", [
        "--model", local["model"], "--dataset", local["data"], "--num-calibration", "8", "--limit", "6",
        "--batch-size", "4", "--mixed-precision", "--output", str(out),
    ])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header + 1].split()[0] == "float" and lines[header + 2].startswith("LRP-QViT W4/A4 mixed")
    assert lines[header + 2].split()[-3].endswith("%") and "pt" in lines[header + 2]
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()


def test_examples_refuse_class_names_the_model_does_not_have(local, tmp_path):
    import json

    import datasets
    from local_files import CLASS_NAMES

    named = make_model_dir(tmp_path / "named")  # a model whose labels have names: the dataset's class names
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = dict(enumerate(CLASS_NAMES))
    config["label2id"] = {name: i for i, name in enumerate(CLASS_NAMES)}
    (named / "config.json").write_text(json.dumps(config))
    renamed = tmp_path / "renamed"
    data = datasets.load_from_disk(local["data"])
    names = [f"digit_{i}" for i in range(len(CLASS_NAMES))]
    data.cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(renamed))
    with pytest.raises(SystemExit, match=r"error: .*digit_0"):
        run_example("quantize_and_evaluate.py", ["--model", str(named), "--dataset", str(renamed),
                                                 "--num-calibration", "4", "--limit", "4", "--batch-size", "4"])


def test_evaluate_distributed_with_accelerate_launch(local, tmp_path):
    from test_cli import cli

    quantized = tmp_path / "quantized"
    assert cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4",
                     "--output", str(quantized)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", str(EXAMPLES / "evaluate_distributed.py"),
               "--model", str(quantized), "--dataset", local["data"], "--split", "validation", "--batch-size", "3"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top-1 accuracy:" in proc.stdout and "on 8 images" in proc.stdout and "1 process(es)" in proc.stdout


def test_evaluate_distributed_on_two_cpu_processes(local, tmp_path):
    from test_cli import cli

    quantized = tmp_path / "quantized"
    assert cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4",
                     "--output", str(quantized)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(EXAMPLES / "evaluate_distributed.py"), "--cpu", "--model", str(quantized), "--dataset",
               local["data"], "--split", "validation", "--batch-size", "3"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("top-1 accuracy:")]
    assert len(results) == 1 and "on 8 images" in results[0] and "2 process(es)" in results[0]


def test_push_to_hub_uploads_model_card_and_plot(local, hub_server, tmp_path):
    code = (
        "import runpy, sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.argv = ['push_to_hub.py', '--model', {local['model']!r}, '--dataset', {local['data']!r},"
        " '--num-calibration', '4', '--mixed-precision', '--repo-id', 'me/tiny-vit-lrpq']\n"
        f"runpy.run_path({str(EXAMPLES / 'push_to_hub.py')!r}, run_name='__main__')\n"
    )
    proc = run_with_hub(hub_server, code, tmp_path)
    assert f"pushed: {hub_server.endpoint}/me/tiny-vit-lrpq/commit/" in proc.stdout
    repo = hub_server.root / "me" / "tiny-vit-lrpq"
    files = {p.name for p in repo.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "lrpq_bits.png"} <= files
    card = (repo / "README.md").read_text()
    assert "- lrpq" in card and "import optimum_lrpq" in card and 'from_pretrained("me/tiny-vit-lrpq")' in card
    assert not hub_server.unhandled, hub_server.unhandled

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(repo)  # what the Hub now serves
    assert model.is_quantized and model.config.quantization_config.mixed_precision


def test_push_to_hub_offline_is_one_line_and_keeps_the_folder(local, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    folder = tmp_path / "kept"
    with pytest.raises(SystemExit) as exit_info:
        run_example("push_to_hub.py", ["--model", local["model"], "--dataset", local["data"], "--num-calibration", "4",
                                       "--repo-id", "me/tiny-vit-lrpq", "--output", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"push_to_hub.py: error: Saved {folder}, but uploading it to me/tiny-vit-lrpq failed: ")
    assert line.endswith("HF_HUB_OFFLINE is set: unset it where the Hub is reachable, or upload the folder later with "
                         f"`hf upload me/tiny-vit-lrpq {folder}`.")
    assert {"model.safetensors", "README.md", "lrpq_bits.png", "preprocessor_config.json"} <= set(os.listdir(folder))
