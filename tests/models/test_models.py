"""Architecture adapters: every name a layout gives exists in the model and is what the layout says it is."""

from __future__ import annotations

import pytest
import tiny_models
from torch import nn

from optimum_lrpq.models import Block, LayerNormGroup, ModelLayout, get_adapter, supported_models

NAMES = (*tiny_models.MODEL_NAMES, "dinov2_backbone")


def build(name: str) -> tuple[nn.Module, ModelLayout]:
    model = tiny_models.build(name)
    return model, get_adapter(model).layout(model)


def test_every_supported_class_is_covered_here():
    assert {type(tiny_models.build(name)).__name__ for name in NAMES} == set(supported_models())


@pytest.mark.parametrize("name", list(NAMES))
def test_weight_layers_are_the_linears_and_convs(name):
    model, layout = build(name)
    modules = dict(model.named_modules())
    weight_layers = layout.weight_layers()
    assert len(weight_layers) == len(set(weight_layers))
    assert set(weight_layers) == {n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert isinstance(modules[layout.patch_embedding], nn.Conv2d)
    assert all(isinstance(modules[h], nn.Linear) for h in layout.heads)


@pytest.mark.parametrize("name", list(NAMES))
def test_relevance_facts_name_real_modules(name):
    model, layout = build(name)
    modules = dict(model.named_modules())
    weight_layers = set(layout.weight_layers())
    assert len(layout.residuals) == 2 * len(layout.blocks)
    for site in layout.residuals:
        assert isinstance(modules[site.start], nn.LayerNorm)  # pre-norm: the branch starts at its LayerNorm
        assert site.end in modules
        assert site.layers and set(site.layers) <= weight_layers
    in_branches = [layer for site in layout.residuals for layer in site.layers]
    assert len(in_branches) == len(set(in_branches))  # a layer belongs to one branch at most
    assert all(unit in modules for unit in layout.conservation_units)
    assert len(layout.conservation_units) >= len(layout.blocks)
    for scale in layout.layer_scales:
        assert type(modules[scale]).__name__.endswith("LayerScale")
    if layout.heads:
        assert sum(layout.start_shares().values()) == pytest.approx(1.0)
    else:
        assert layout.start_shares() == {}


def test_architecture_specific_facts():
    _, deit = build("deit_teacher")
    assert deit.start_shares() == {"cls_classifier": 0.5, "distillation_classifier": 0.5}
    _, swin = build("swin")
    assert "swin.encoder.layers.0.downsample" in swin.conservation_units
    assert swin.residuals[0].end == "swin.encoder.layers.0.blocks.0.drop_path"
    _, dinov2 = build("dinov2")
    assert dinov2.residuals[0].end == "dinov2.encoder.layer.0.layer_scale1"
    assert dinov2.residuals[1].end == "dinov2.encoder.layer.0.layer_scale2"
    assert len(dinov2.layer_scales) == 4
    _, backbone = build("dinov2_backbone")
    assert backbone.heads == () and backbone.residuals[0].start == "encoder.layer.0.norm1"


def test_supported_models_with_head():
    assert "Dinov2Model" in supported_models()
    assert "Dinov2Model" not in supported_models(with_head=True)
    assert set(supported_models()) - set(supported_models(with_head=True)) == {"Dinov2Model"}


def test_a_layout_built_without_the_relevance_fields_still_works():
    block = Block("attn", q="q", k="k", v="v", o="o", fc1="fc1", fc2="fc2")
    layout = ModelLayout(patch_embedding="conv", groups=(LayerNormGroup("ln", ("q",)),), linears=("o", "head"),
                         attentions=("attn",), blocks=(block,), heads=("head",))
    assert layout.weight_layers() == ["conv", "q", "o", "head"]
    assert layout.residuals == () and layout.conservation_units == () and layout.layer_scales == ()
    assert layout.start_shares() == {"head": 1.0}
    assert block.qkv == ("q", "k", "v") and block.attention_linears == ("q", "k", "v", "o")
    assert block.mlp_linears == ("fc1", "fc2")
    with pytest.raises(ValueError, match="one entry per head"):
        ModelLayout("conv", (), ("head",), (), (), ("head",), head_shares=(0.5, 0.5))


def test_dinov2_with_swiglu_is_refused_clearly():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    model = Dinov2ForImageClassification(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64,
                                                      use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        get_adapter(model).layout(model)
