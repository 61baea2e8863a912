"""push_to_hub of a quantized model -> from_pretrained(repo_id) through the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

from hub_server import run_with_hub
from huggingface_hub import ModelCard

TESTS = Path(__file__).parents[1]  # tiny_models.py

PUSH = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import tiny_models as T
from optimum_lrpq import LRPQConfig, LRPQuantizer
model = T.build("{name}")
LRPQuantizer(LRPQConfig(weight_bits=4, activation_bits=6)).quantize_model(model, T.pixels(8), show_progress=False)
info = model.push_to_hub("me/tiny-{name}-lrpq", tags=["mnist"], commit_message="first push")
print("COMMIT", info.commit_url)
model.save_pretrained({saved!r}, push_to_hub=True, repo_id="me/tiny-{name}-lrpq-sp")
url = LRPQuantizer().push_to_hub(model, "me/tiny-{name}-lrpq-card")
print("CARD COMMIT", url)
from safetensors.torch import save_file
save_file({{"logits": T.logits(model, T.pixels(3, seed=9))}}, {out!r})
"""

PULL = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import tiny_models as T
import optimum_lrpq
from transformers import AutoModelForImageClassification
model, info = AutoModelForImageClassification.from_pretrained("me/tiny-{name}-lrpq", output_loading_info=True,
                                                              disable_mmap=True)
assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
assert type(model.hf_quantizer).__name__ == "LRPQHfQuantizer"
from safetensors.torch import load_file
expected = load_file({out!r})["logits"]
assert torch.equal(T.logits(model.eval(), T.pixels(3, seed=9)), expected)
print("EQUAL OK")
"""


def test_push_to_hub_then_load_by_repo_id(hub_server, tmp_path):
    name = "swin"
    out = str(tmp_path / "expected.safetensors")
    saved = str(tmp_path / "saved")
    pushed = run_with_hub(hub_server, PUSH.format(tests=str(TESTS), name=name, out=out, saved=saved), tmp_path)
    assert f"{hub_server.endpoint}/me/tiny-{name}-lrpq/commit/" in pushed.stdout
    repo = hub_server.root / "me" / f"tiny-{name}-lrpq"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in repo.iterdir()}
    # model.push_to_hub() itself uploads the lrpq card (not transformers' template), with the extra tag
    card = ModelCard.load(repo / "README.md")
    assert card.data.tags == ["lrpq", "quantization", "vision", "mnist"]
    assert f'from_pretrained("me/tiny-{name}-lrpq")' in card.text and "import optimum_lrpq" in card.text
    assert (hub_server.root / "me" / f"tiny-{name}-lrpq-sp" / "model.safetensors").read_bytes() == (
        tmp_path / "saved" / "model.safetensors").read_bytes()
    assert "import optimum_lrpq" in (hub_server.root / "me" / f"tiny-{name}-lrpq-sp" / "README.md").read_text()
    card = (hub_server.root / "me" / f"tiny-{name}-lrpq-card" / "README.md").read_text()
    assert "import optimum_lrpq" in card
    pulled = run_with_hub(hub_server, PULL.format(tests=str(TESTS), name=name, out=out), tmp_path)
    assert "EQUAL OK" in pulled.stdout
    assert not hub_server.unhandled, hub_server.unhandled
