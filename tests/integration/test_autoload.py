"""The installed lazy import hook (`optimum_lrpq_autoload.pth` -> `optimum_lrpq_autoload`).

Every check runs in a fresh interpreter, because the hook acts at interpreter start (site-packages `.pth`) and on the
first import of transformers' modeling code; this test process has long since done both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HOOK_MISSING = (
    "optimum_lrpq_autoload was not imported at interpreter start: optimum_lrpq_autoload.pth is not installed in "
    "site-packages. Install the package (`pip install -e '.[dev]'` or `pip install .`)."
)


def _run(code: str, tmp_path: Path, extra_path: Path | None = None, **env_overrides: str) -> dict:
    """Run ``code`` in a fresh ``python``; it must print one JSON object as its last stdout line."""
    env = dict(os.environ)
    env.pop("OPTIMUM_LRPQ_NO_AUTOLOAD", None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,  # a failure is reported below with its output
        cwd=tmp_path,  # not the repo root, so that nothing is found through the cwd entry of sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    assert "optimum_lrpq_autoload" not in proc.stderr, f"the hook warned:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _finders_snippet() -> str:
    return "[type(f).__name__ for f in sys.meta_path if getattr(f, '_optimum_lrpq_autoload', False)]"


def test_importing_transformers_model_api_imports_the_plugin(tmp_path):
    state = _run(
        f"""
        import json, sys
        hooked = "optimum_lrpq_autoload" in sys.modules
        import transformers
        after_transformers = "optimum_lrpq" in sys.modules
        from transformers import AutoModelForImageClassification
        print(json.dumps({{
            "hooked": hooked,
            "after_transformers": after_transformers,
            "after_auto": "optimum_lrpq" in sys.modules,
            "plugin_file": getattr(sys.modules.get("optimum_lrpq"), "__file__", None),
            "finders": {_finders_snippet()},
        }}))
        """,
        tmp_path,
    )
    assert state["hooked"], HOOK_MISSING
    assert not state["after_transformers"], "`import transformers` alone must stay lazy"
    assert state["after_auto"], "`from transformers import AutoModelFor...` did not import optimum_lrpq"
    assert state["plugin_file"] and Path(state["plugin_file"]).parent.name == "optimum_lrpq"
    assert state["finders"] == [], "the finder must remove itself once it has fired"


def test_plain_python_start_imports_neither_torch_nor_the_plugin(tmp_path):
    state = _run(
        f"""
        import json, sys
        import collections, email.message  # any ordinary imports
        print(json.dumps({{
            "hooked": "optimum_lrpq_autoload" in sys.modules,
            "heavy": sorted(m for m in ("torch", "transformers", "optimum_lrpq", "numpy") if m in sys.modules),
            "finders": {_finders_snippet()},
        }}))
        """,
        tmp_path,
    )
    assert state["hooked"], HOOK_MISSING
    assert state["heavy"] == []
    assert state["finders"] == ["_AutoloadFinder"]


def test_importing_the_hook_again_or_late_is_harmless(tmp_path):
    state = _run(
        f"""
        import json, sys
        hooked = "optimum_lrpq_autoload" in sys.modules
        # A second import (fresh module object) must not install a second finder.
        del sys.modules["optimum_lrpq_autoload"]
        import optimum_lrpq_autoload
        finders_twice = {_finders_snippet()}
        from transformers import AutoModelForImageClassification
        fired = "optimum_lrpq" in sys.modules
        finders_after_fire = {_finders_snippet()}
        # Imported again after transformers' modeling code: nothing to hook, the plugin is already there.
        del sys.modules["optimum_lrpq_autoload"]
        import optimum_lrpq_autoload
        import transformers.modeling_utils
        print(json.dumps({{
            "hooked": hooked,
            "finders_twice": finders_twice,
            "fired": fired,
            "finders_after_fire": finders_after_fire,
            "finders_late": {_finders_snippet()},
            "plugin": "optimum_lrpq" in sys.modules,
        }}))
        """,
        tmp_path,
    )
    assert state["hooked"], HOOK_MISSING
    assert state["finders_twice"] == ["_AutoloadFinder"]
    assert state["fired"]
    assert state["finders_after_fire"] == []
    assert state["finders_late"] == []
    assert state["plugin"]


def test_hook_can_be_disabled_and_imported_late(tmp_path):
    # Disabled at startup: transformers' modeling code loads without the plugin. Importing the hook afterwards (with
    # the switch off) imports the plugin right away, as there is nothing left to wait for.
    state = _run(
        f"""
        import json, os, sys
        from transformers import PreTrainedModel
        disabled = {{"plugin": "optimum_lrpq" in sys.modules, "finders": {_finders_snippet()}}}
        del sys.modules["optimum_lrpq_autoload"]
        del os.environ["OPTIMUM_LRPQ_NO_AUTOLOAD"]
        import optimum_lrpq_autoload
        late = {{"plugin": "optimum_lrpq" in sys.modules, "finders": {_finders_snippet()}}}
        print(json.dumps({{"disabled": disabled, "late": late}}))
        """,
        tmp_path,
        OPTIMUM_LRPQ_NO_AUTOLOAD="1",
    )
    assert state["disabled"] == {"plugin": False, "finders": []}
    assert state["late"] == {"plugin": True, "finders": []}


# A stand-in plugin, found before the real one through PYTHONPATH: it records when it was imported and imports model
# classes itself, as a real plugin may. That must work even when the user's own import of a model module triggered it.
STUB_PLUGIN = """
import sys
from transformers import ViTForImageClassification  # fails if fired while modeling_vit is half executed
sys.lrpq_stub_state = {
    "modeling_utils": "transformers.modeling_utils" in sys.modules,
    "vit_class": ViTForImageClassification.__name__,
}
"""


@pytest.fixture
def stub_plugin(tmp_path):
    root = tmp_path / "stub"
    (root / "optimum_lrpq").mkdir(parents=True)
    (root / "optimum_lrpq" / "__init__.py").write_text(STUB_PLUGIN)
    return root


def test_hook_waits_until_the_triggering_model_module_is_fully_imported(tmp_path, stub_plugin):
    # `modeling_vit` imports `modeling_utils` (the trigger) half-way through; the plugin may only run afterwards.
    state = _run(
        """
        import json, sys
        from transformers import ViTForImageClassification
        m = sys.modules["transformers.models.vit.modeling_vit"]
        print(json.dumps({
            "plugin_file": getattr(sys.modules.get("optimum_lrpq"), "__file__", None),
            "stub": getattr(sys, "lrpq_stub_state", None),
            "loaders": [type(m.__loader__).__name__, type(m.__spec__.loader).__name__],
        }))
        """,
        tmp_path,
        extra_path=stub_plugin,
    )
    assert state["plugin_file"] == str(stub_plugin / "optimum_lrpq" / "__init__.py")
    assert state["stub"] == {"modeling_utils": True, "vit_class": "ViTForImageClassification"}
    # The hook's loader wrapper leaves no trace on the imported modules.
    assert state["loaders"] == ["SourceFileLoader", "SourceFileLoader"]


LOAD_WITHOUT_IMPORT = r"""
import sys
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
import torch
model, info = AutoModelForImageClassification.from_pretrained({path!r}, output_loading_info=True, disable_mmap=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
assert type(model.hf_quantizer).__name__ == "LRPQHfQuantizer", model.hf_quantizer
x = load_file({inputs!r})
with torch.no_grad():
    assert torch.equal(model.eval()(pixel_values=x["x"]).logits, x["logits"])
print("LOADED QUANTIZED")
"""


def test_quantized_checkpoint_loads_without_explicit_import(tmp_path):
    import sys as _sys

    from safetensors.torch import save_file

    _sys.path.insert(0, str(Path(__file__).parents[1]))
    import tiny_models as T

    from optimum_lrpq import LRPQConfig, LRPQuantizer

    model = LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=4)).quantize_model(
        T.build("vit"), T.pixels(4), show_progress=False
    )
    model.save_pretrained(tmp_path / "ckpt")
    x = T.pixels(2, seed=3)
    save_file({"x": x, "logits": T.logits(model, x)}, tmp_path / "inputs.safetensors")
    code = LOAD_WITHOUT_IMPORT.format(path=str(tmp_path / "ckpt"), inputs=str(tmp_path / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_LRPQ_NO_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED QUANTIZED" in result.stdout
