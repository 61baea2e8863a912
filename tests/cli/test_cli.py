"""`optimum-lrpq` commands (in process through `main([...])`), their error messages, and `optimum-cli lrpq`.

Also holds the builders of the tiny local model directory and image dataset used by the example and on-the-fly
tests (`make_model_dir`, `make_dataset_dir`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from local_files import CLASS_NAMES, make_dataset_dir, make_image_folder, make_model_dir, single_thread  # noqa: F401

from optimum_lrpq import cli
from optimum_lrpq.cli import app, common
from optimum_lrpq.cli import demo as demo_command


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"model": str(make_model_dir(root / "float")), "data": str(make_dataset_dir(root / "data")), "root": root}


@pytest.fixture(scope="module")
def quantized(local):
    """`optimum-lrpq quantize` output (mixed precision), shared by the tests that read it."""
    out = local["root"] / "quantized"
    status = cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "8",
                       "--weight-bits", "4", "--activation-bits", "4", "--mixed-precision", "--output", str(out)])
    assert status == 0
    return out


def run_error(capsys, argv) -> str:
    """Run a command that must fail cleanly: exit status 2, one line on stderr, no traceback."""
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == common.EXIT_ERROR, err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]  # not tqdm bars
    assert len(lines) == 1 and lines[0].startswith("optimum-lrpq: error: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------------


def test_console_script_help_in_a_subprocess():
    script = Path(sys.executable).with_name("optimum-lrpq")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "optimum_lrpq.cli"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in app.COMMANDS:
        assert name in proc.stdout
    assert "Start with 'optimum-lrpq demo'" in proc.stdout


@pytest.mark.parametrize("command,option", [("quantize", "--mixed-precision"), ("evaluate", "--baseline"),
                                            ("inspect", "--plot"), ("demo", "--overwrite")])
def test_every_command_has_help(capsys, command, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_quantize_writes_model_processor_card_and_plot(quantized, local):
    from transformers import AutoModelForImageClassification

    files = {p.name for p in quantized.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "lrpq_bits.png"} <= files
    assert not leftovers(quantized.parent)
    saved = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lrpq" and saved["mixed_precision"] is True and saved["relevance"]
    card = (quantized / "README.md").read_text()
    assert "library_name: transformers" in card and "import optimum_lrpq" in card and "lrpq_bits.png" in card
    assert (quantized / "lrpq_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForImageClassification.from_pretrained(quantized)
    assert model.is_quantized and type(model.hf_quantizer).__name__ == "LRPQHfQuantizer"


def test_evaluate_with_baseline_prints_both_models(quantized, local, capsys):
    capsys.readouterr()
    assert cli.main(["evaluate", str(quantized), "--dataset", local["data"], "--limit", "6", "--batch-size", "4",
                     "--baseline", local["model"]]) == 0
    out = capsys.readouterr().out
    assert "6 images of" in out and "(validation)" in out
    header, _, baseline, quantized_row = out.strip().splitlines()[-4:]
    assert header.split()[:4] == ["model", "top-1", "drop", "images/s"]
    assert baseline.startswith(f"{local['model']} (baseline)") and baseline.split()[-2:] == ["32", "32"]
    assert quantized_row.startswith(str(quantized)) and "pt" in quantized_row and "%" in quantized_row


def test_inspect_prints_bits_and_relevance_and_writes_the_plot(quantized, tmp_path, capsys):
    capsys.readouterr()
    plot = tmp_path / "bits.png"
    assert cli.main(["inspect", str(quantized), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    bits = json.loads((quantized / "config.json").read_text())["quantization_config"]["layer_bits"]
    lines = out.splitlines()
    layer_rows = [line.split() for line in lines if line.startswith(("vit.", "classifier"))]
    assert [row[0] for row in layer_rows][:2] == ["vit.embeddings.patch_embeddings.projection",
                                                  "vit.layers.0.attention.q_proj"]  # model order, not alphabetical
    for name, *values in layer_rows:
        if "weight" in bits[name]:  # layer, W bits, A bits, relevance
            assert [bits[name]["weight"], bits[name]["activation"]] == [int(v) for v in values[:2]]
        else:  # shared activation quantizer, A bits
            assert [bits[name]["activation"]] == [int(v) for v in values]
    assert {row[0] for row in layer_rows} == set(bits)
    assert "average bits" in out and plot.stat().st_size > 10_000


def test_hand_edited_checkpoint_error_is_printed_whole(quantized, tmp_path, capsys):
    """The loader's error reaches the user complete: the tensor by both names, and the last sentence (the fix)."""
    import shutil

    from safetensors.torch import load_file, save_file

    edited = tmp_path / "edited"
    shutil.copytree(quantized, edited)
    tensors = load_file(edited / "model.safetensors")
    stored = "vit.encoder.layer.0.intermediate.dense.weight_zero_point"
    tensors[stored] = tensors[stored].clone()
    tensors[stored].view(-1)[0] = 3.5  # integer kernels need whole zero points
    save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    # The error names the layer as config.json does (mixed precision: its bits give the zero-point range).
    bits = json.loads((edited / "config.json").read_text())["quantization_config"]["layer_bits"]
    qmax = 2 ** bits["vit.layers.0.mlp.fc1"]["weight"] - 1
    line = run_error(capsys, ["inspect", str(edited)])
    assert line == (
        f"optimum-lrpq: error: Could not load the model in directory {edited}: This lrpq checkpoint holds grids no "
        f"quantized layer can use: `vit.layers.0.mlp.fc1.weight_zero_point` (stored as `{stored}`) has 1 zero point(s) "
        f"not whole numbers in [0, {qmax}] (e.g. 3.5). It is corrupt or was edited by hand; re-export it with "
        "optimum-lrpq (quantize the float model again)."
    )


def test_demo_command_runs_the_demo(tmp_path, capsys):
    out_dir = tmp_path / "demo-out"
    capsys.readouterr()
    assert cli.main(["demo", "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("model "):].splitlines()
    assert table[0].split() == ["model", "top-1", "drop", "size", "on", "disk", "avg", "W", "bits", "avg", "A", "bits"]
    float_row, quantized_row = table[2].split(), table[3].split()
    assert float_row[:2] == ["float32", "96.40%"]  # the shipped model on the 500 shipped digits
    assert quantized_row[:4] == ["LRP-QViT", "W4/A4", "mixed", quantized_row[3]]
    assert float(quantized_row[3].rstrip("%")) > 90.0
    assert float(quantized_row[-2]) <= 4.0 + 1e-9 and float(quantized_row[-1]) <= 4.0 + 1e-9
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "lrpq_bits.png", "preprocessor_config.json"} <= files
    assert "96.40%" in (out_dir / "README.md").read_text()
    assert app.build_parser().parse_args(["demo"]).func is demo_command.run


def test_optimum_cli_subcommand_runs_the_same_commands(quantized, tmp_path, capsys):
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands, register_optimum_cli_subcommand

    from optimum.commands.register.lrpq import LRPQCommand

    commands = [command for command, _ in load_optimum_namespace_cli_commands()]
    assert LRPQCommand in commands
    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    register_optimum_cli_subcommand(LRPQCommand, parent_command=root)
    plot = tmp_path / "p.png"
    args = root.parser.parse_args(["lrpq", "inspect", str(quantized), "--plot", str(plot)])
    capsys.readouterr()
    args.func(args).run()
    assert "vit.layers.0.mlp.fc1" in capsys.readouterr().out and plot.exists()


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_image_column_lists_the_available_ones(local, tmp_path, capsys):
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--image-column", "picture",
                              "--output", str(tmp_path / "out")])
    assert "no image column 'picture'; available columns: image, label" in line
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unknown_label_column_lists_the_available_ones(local, capsys):
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--label-column", "target"])
    assert "no label column 'target'; available columns: image, label" in line


def test_missing_split_lists_the_splits(local, capsys):
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", local["data"], "--split", "test"])
    assert "no split 'test'; available splits: train, validation" in line


def test_unreachable_model_id_says_so_and_how_to_use_a_local_directory(local, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail fast, like offline
    line = run_error(capsys, ["evaluate", "facebook/deit-tiny-patch16-224", "--dataset", local["data"]])
    assert "'facebook/deit-tiny-patch16-224' is not a local directory" in line and "unreachable" in line
    assert "local directory saved with save_pretrained()" in line


def test_missing_model_directory(local, capsys):
    line = run_error(capsys, ["inspect", "./no/such/model-dir"])
    assert "No such directory: ./no/such/model-dir" in line and "because it starts with '.'" in line


def test_inspect_refuses_a_float_model(local, capsys):
    assert "not an lrpq-quantized model" in run_error(capsys, ["inspect", local["model"]])


def test_existing_output_needs_overwrite_and_overwrite_replaces_it(local, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4", "--output", str(out)]
    line = run_error(capsys, argv)
    assert "already exists; pass --overwrite" in line and (out / "keep.txt").read_text() == "mine"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_no_half_written_output(local, tmp_path, monkeypatch, capsys, existing):
    import optimum_lrpq.integration.model_card

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def interrupt(*args, **kwargs):
        assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # weights already written there
        raise KeyboardInterrupt

    monkeypatch.setattr(optimum_lrpq.integration.model_card, "write_model_card", interrupt)
    status = cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4",
                       "--output", str(out), "--overwrite"])
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert not leftovers(tmp_path)
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_bad_bits_are_a_one_line_error(local, tmp_path, capsys):
    line = run_error(capsys, ["quantize", local["model"], "--dataset", local["data"], "--weight-bits", "9",
                              "--output", str(tmp_path / "o")])
    assert "weight_bits must be between 2 and 8" in line


def test_dataset_directory_that_does_not_exist(local, tmp_path, capsys):
    line = run_error(capsys, ["evaluate", local["model"], "--dataset", str(tmp_path / "nothing")])
    assert f"No such directory: '{tmp_path / 'nothing'}'" in line and "because it starts with '/'" in line


def test_format_table_aligns_columns():
    table = common.format_table(["a", "bb"], [["x", 1], ["yyy", 22]])
    assert table.splitlines() == ["a    bb", "---  --", "x     1", "yyy  22"]



def test_quantize_push_to_hub_uploads_the_written_folder(local, hub_server, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server.endpoint)  # HfApi() reads it when created
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    out = tmp_path / "pushed"
    capsys.readouterr()
    assert cli.main(["quantize", local["model"], "--dataset", local["data"], "--num-samples", "4", "--output", str(out),
                     "--push-to-hub", "me/tiny-cli-lrpq"]) == 0
    assert f"{hub_server.endpoint}/me/tiny-cli-lrpq/commit/" in capsys.readouterr().out
    repo = hub_server.root / "me" / "tiny-cli-lrpq"
    assert {p.name for p in repo.iterdir()} == {p.name for p in out.iterdir()}
    assert 'from_pretrained("me/tiny-cli-lrpq")' in (repo / "README.md").read_text()
    assert not hub_server.unhandled
