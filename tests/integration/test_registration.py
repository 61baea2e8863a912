"""Importing the plugin registers `lrpq` with transformers, idempotently."""

from __future__ import annotations

import importlib
import subprocess
import sys

from transformers import AttentionInterface
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import optimum_lrpq
from optimum_lrpq.integration import registration


def test_registered():
    assert AUTO_QUANTIZER_MAPPING["lrpq"].__name__ == "LRPQHfQuantizer"
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lrpq"] is optimum_lrpq.LRPQConfig
    assert "lrpq" in AttentionInterface._global_mapping


def test_register_twice_and_reload_do_not_raise():
    registration.register()
    registration.register()
    reloaded = importlib.reload(optimum_lrpq)
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lrpq"] is reloaded.LRPQConfig


def test_import_in_fresh_interpreter_twice():
    code = "import importlib, optimum_lrpq; importlib.reload(optimum_lrpq); import optimum_lrpq; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
