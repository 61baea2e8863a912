"""Same model, data and seed -> byte-identical checkpoint; and nothing in the package reads or writes pickle."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from tiny_models import build, pixels

from optimum_lrpq import LRPQConfig, LRPQuantizer

PACKAGE = Path(__file__).resolve().parents[2] / "optimum_lrpq"


def checkpoint_digest(tmp_path, name, **options):
    model = build("swin")
    config = LRPQConfig(weight_bits=4, activation_bits=4, weight_range="percentile_mse",
                        activation_range="percentile_mse", **options)
    LRPQuantizer(config).quantize_model(model, pixels(8), show_progress=False)
    model.save_pretrained(tmp_path / name)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).iterdir())}


@pytest.mark.parametrize("mixed", [False, True])
def test_same_inputs_same_bytes(tmp_path, mixed):
    first = checkpoint_digest(tmp_path, "a", mixed_precision=mixed)
    second = checkpoint_digest(tmp_path, "b", mixed_precision=mixed)
    assert first == second
    assert "model.safetensors" in first


def _pickle_uses(tree: ast.AST) -> list[int]:
    """Line numbers of pickle imports, torch.load/torch.save calls and weights_only=False."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in ("pickle", "dill") for m in modules):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("load", "save") and \
                    isinstance(func.value, ast.Name) and func.value.id == "torch":
                lines.append(node.lineno)
            if any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False
                   for k in node.keywords):
                lines.append(node.lineno)
    return lines


def test_package_never_uses_pickle():
    offenders = [f"{path.relative_to(PACKAGE)}:{line}" for path in PACKAGE.rglob("*.py")
                 for line in _pickle_uses(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_pickle_scan_finds_pickle():
    code = "import pickle\nimport torch\ntorch.load('x')\ntorch.save(1, 'y')\nf(weights_only=False)\n"
    assert _pickle_uses(ast.parse(code)) == [1, 3, 4, 5]
