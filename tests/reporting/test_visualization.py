"""The relevance/bits plot: a readable PNG, written headless, layers in model order."""

from __future__ import annotations

import pytest

from optimum_lrpq.reporting.plot import plot_bits_and_relevance, short_layer_name
from optimum_lrpq.reporting.summary import ordered_layer_names

LAYER_BITS = {
    "vit.embeddings.patch_embeddings.projection": {"weight": 4, "activation": 8},
    "vit.layers.0.attention.q_proj": {"weight": 5, "activation": 5},
    "vit.layers.0.layernorm_before": {"activation": 5},
    "vit.layers.0.mlp.fc1": {"weight": 3, "activation": 3},
    "vit.layers.10.mlp.fc1": {"weight": 4, "activation": 4},
    "vit.layers.2.mlp.fc1": {"weight": 4, "activation": 4},
    "classifier": {"weight": 6, "activation": 6},
}
RELEVANCE = {"vit.embeddings.patch_embeddings.projection": 0.2, "vit.layers.0.attention.q_proj": 0.1,
             "vit.layers.0.mlp.fc1": 0.05, "vit.layers.2.mlp.fc1": 0.05, "vit.layers.10.mlp.fc1": 0.1,
             "classifier": 0.5}


@pytest.mark.parametrize("relevance", [RELEVANCE, None])
def test_plot_is_written_as_png(tmp_path, relevance):
    path = plot_bits_and_relevance(LAYER_BITS, relevance, tmp_path / "sub" / "bits.png", title="tiny")
    data = (tmp_path / "sub" / "bits.png").read_bytes()
    assert path == str(tmp_path / "sub" / "bits.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_config_without_weight_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no layer with weight bits"):
        plot_bits_and_relevance({"x.layernorm": {"activation": 4}}, None, tmp_path / "x.png")


def test_layer_order():
    names = [n for n, e in LAYER_BITS.items() if "weight" in e]
    assert ordered_layer_names(names) == [
        "classifier", "vit.embeddings.patch_embeddings.projection", "vit.layers.0.attention.q_proj",
        "vit.layers.0.mlp.fc1", "vit.layers.2.mlp.fc1", "vit.layers.10.mlp.fc1",
    ]
    model_order = ["vit.embeddings.patch_embeddings.projection", "vit.layers.0.attention.q_proj",
                   "vit.layers.0.mlp.fc1", "vit.layers.2.mlp.fc1", "vit.layers.10.mlp.fc1", "classifier"]
    assert ordered_layer_names(reversed(names), model_order) == model_order
    assert short_layer_name("swin.encoder.layers.1.blocks.0.mlp.fc1") == "1.0.mlp.fc1"
    assert short_layer_name("vit.layers.3.attention.q_proj") == "3.attention.q_proj"
