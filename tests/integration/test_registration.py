"""Importing the plugin registers `lrpq` with transformers (once transformers' modeling code is loaded), idempotently;
the import itself is light."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
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


LAZY_IMPORT = """
import json, sys
import optimum_lrpq
light = sorted(m for m in ("torch", "transformers", "optimum_lrpq.integration.registration") if m in sys.modules)
from transformers import AttentionInterface, AutoModelForImageClassification
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
print(json.dumps({
    "light": light,
    "quantizer": getattr(AUTO_QUANTIZER_MAPPING.get("lrpq"), "__name__", None),
    "config": AUTO_QUANTIZATION_CONFIG_MAPPING.get("lrpq") is optimum_lrpq.LRPQConfig,
    "attention": "lrpq" in AttentionInterface._global_mapping,
}))
"""


@pytest.mark.parametrize("autoload", ["installed", "switched off"])
def test_import_is_light_and_registers_once_transformers_models_are_imported(autoload):
    """`import optimum_lrpq` imports neither torch nor transformers (the command line starts at once), and the
    registration still happens before any `from_pretrained`, also with the start-up hook switched off."""
    env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_LRPQ_NO_AUTOLOAD"}
    if autoload == "switched off":
        env["OPTIMUM_LRPQ_NO_AUTOLOAD"] = "1"
    result = subprocess.run([sys.executable, "-c", LAZY_IMPORT], capture_output=True, text=True, timeout=120,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"light": [], "quantizer": "LRPQHfQuantizer", "config": True, "attention": True}


def test_public_names_load_on_first_use_and_register_right_away_after_transformers():
    code = ("import sys; from transformers import AutoModelForImageClassification; import optimum_lrpq; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
            "registered = 'lrpq' in AUTO_QUANTIZER_MAPPING; loaded = 'optimum_lrpq.integration.quantizer' in sys.modules; "
            "quantizer = optimum_lrpq.LRPQuantizer; "
            "print(registered, loaded, quantizer.__module__, sorted(set(optimum_lrpq.__all__) - set(dir(optimum_lrpq))))")
    env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_LRPQ_NO_AUTOLOAD"}
    env["OPTIMUM_LRPQ_NO_AUTOLOAD"] = "1"  # transformers' models are loaded first: registration is the import's job
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True False optimum_lrpq.integration.quantizer []"
    with pytest.raises(AttributeError, match="module 'optimum_lrpq' has no attribute 'LRPQuantiser'"):
        optimum_lrpq.LRPQuantiser  # noqa: B018
