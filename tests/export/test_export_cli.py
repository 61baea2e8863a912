"""`optimum-lrpq export DIR --format onnx`: writes DIR/model.onnx (or --output), prints how ONNX Runtime runs it, and
reports bad input in one line with exit status 2."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from tiny_models import IMAGE_SIZE, build

from optimum_lrpq import LRPQConfig, LRPQuantizer, cli
from optimum_lrpq.demo import DIGITS_PATH
from optimum_lrpq.export import onnxruntime_session


def digits(count: int) -> torch.Tensor:
    images = torch.from_numpy(np.load(DIGITS_PATH)["test_images"][:count]).float() / 255
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return ((images - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViT quantized at mixed W4/A4 on real digits and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("export-cli")
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True, num_calibration_samples=32,
                        weight_rounding="nearest")
    model = LRPQuantizer(config).quantize_model(build("vit"), digits(32), show_progress=False)
    model.save_pretrained(root / "quantized")
    build("vit").save_pretrained(root / "float")
    return root


def run_error(capsys, argv: list[str]) -> str:
    """A command that must fail cleanly: exit status 2 and one line on stderr."""
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("optimum-lrpq: error: ") and "Traceback" not in err, err
    return lines[0]


def test_export_writes_model_onnx_into_the_directory(saved, capsys):
    from transformers import AutoModelForImageClassification

    model_dir = saved / "quantized"
    assert cli.main(["export", str(model_dir), "--format", "onnx", "--quiet"]) == 0
    out = capsys.readouterr().out
    path = model_dir / "model.onnx"
    assert path.is_file()
    assert "QuantizeLinear" in out and "int8 weight initializers" in out
    assert re.search(r"ONNX Runtime: (\d+) matrix products on integer kernels", out)
    assert "same arg max on 100% of the check inputs" in out
    # the file runs and agrees with the saved model on real images
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels = digits(8)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    got = onnxruntime_session(str(path), threads=1).run(None, {"pixel_values": pixels.numpy()})[0]
    assert np.array_equal(got.argmax(-1), expected.argmax(-1).numpy())
    # a second export without --overwrite is refused, the file is kept
    size = path.stat().st_size
    message = run_error(capsys, ["export", str(model_dir)])
    assert "already exists; pass --overwrite" in message
    assert path.stat().st_size == size


def test_unsupported_format(saved, capsys):
    message = run_error(capsys, ["export", str(saved / "quantized"), "--format", "openvino"])
    assert "Unsupported export format 'openvino'; choose one of onnx" in message


def test_unquantized_model(saved, capsys, tmp_path):
    message = run_error(capsys, ["export", str(saved / "float"), "--output", str(tmp_path / "m.onnx")])
    assert "is not an lrpq-quantized model" in message and "optimum-lrpq quantize" in message
    assert not list(tmp_path.iterdir())


def test_output_is_a_directory(saved, capsys, tmp_path):
    message = run_error(capsys, ["export", str(saved / "quantized"), "--output", str(tmp_path)])
    assert "is a directory; give the file to write" in message


def test_missing_onnx(saved, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    message = run_error(capsys, ["export", str(saved / "quantized"), "--output", str(tmp_path / "m.onnx")])
    assert 'pip install "optimum-lrpq[export]"' in message
    assert not list(tmp_path.iterdir())


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--format", "--output", "--opset", "--no-check", "--overwrite"):
        assert option in out
