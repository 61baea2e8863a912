"""End-to-end check of the loopback Hub with the real huggingface_hub client: push_to_hub, then from_pretrained."""

from __future__ import annotations

from hub_server import run_with_hub

CODE = r"""
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

torch.manual_seed(0)
cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=5)
model = ViTForImageClassification(cfg).eval()
info = model.push_to_hub("me/tiny-vit", commit_message="add tiny vit")
print("COMMIT", info.commit_url, info.oid)

loaded = AutoModelForImageClassification.from_pretrained("me/tiny-vit", disable_mmap=True).eval()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)
print("EQUAL OK")
"""


def test_push_then_from_pretrained(hub_server, tmp_path):
    proc = run_with_hub(hub_server, CODE, tmp_path)
    assert "EQUAL OK" in proc.stdout
    repo = hub_server.root / "me" / "tiny-vit"
    assert (repo / "config.json").is_file()
    assert (repo / "model.safetensors").is_file()
    assert (repo / "README.md").is_file()
    assert f"{hub_server.endpoint}/me/tiny-vit/commit/" in proc.stdout
    # the download really went through the server
    assert any(
        m == "GET" and "/me/tiny-vit/resolve/" in p and p.endswith("model.safetensors")
        for m, p, s in hub_server.requests
        if s == 200
    )
    assert not hub_server.unhandled, hub_server.unhandled


def test_missing_repo_and_file(hub_server, tmp_path):
    code = r"""
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
try:
    hf_hub_download("nobody/nothing", "config.json")
except RepositoryNotFoundError:
    print("REPO 404 OK")
from huggingface_hub import HfApi
HfApi().create_repo("me/empty", exist_ok=True)
HfApi().create_repo("me/empty", exist_ok=True)
try:
    hf_hub_download("me/empty", "config.json")
except EntryNotFoundError:
    print("ENTRY 404 OK")
"""
    out = run_with_hub(hub_server, code, tmp_path).stdout
    assert "REPO 404 OK" in out and "ENTRY 404 OK" in out
