"""`TensorNames` translates like transformers itself: the names `save_pretrained` writes and `from_pretrained` reads."""

from __future__ import annotations

import pytest
from tiny_models import MODEL_NAMES, build
from transformers.core_model_loading import revert_weight_conversion

from optimum_lrpq.integration.naming import TensorNames


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_names_match_what_transformers_saves_and_loads(name):
    model = build(name)
    names = TensorNames(model)
    in_memory = list(model.state_dict())
    on_disk = set(revert_weight_conversion(model, dict(model.state_dict())))
    assert {names.stored(n) for n in in_memory} == on_disk
    assert all(names.loaded(names.stored(n)) == n for n in in_memory)


@pytest.mark.parametrize(
    "name, module_path, stored",
    [
        ("vit", "vit.layers.1.mlp.fc1.qweight", "vit.encoder.layer.1.intermediate.dense.qweight"),
        ("deit_teacher", "deit.layers.0.attention.o_proj.input_quant.scale",
         "deit.encoder.layer.0.attention.output.dense.input_quant.scale"),
        ("swin", "swin.encoder.layers.1.blocks.0.attention.q_proj.weight_scale",
         "swin.encoder.layers.1.blocks.0.attention.self.query.weight_scale"),
    ],
)
def test_quantized_tensors_are_described_both_ways(name, module_path, stored):
    names = TensorNames(build(name))
    described = f"`{module_path}` (stored as `{stored}`)"
    assert names.describe(module_path) == described
    assert names.describe_stored(stored) == described


def test_a_name_both_schemes_share_is_given_once():
    assert TensorNames(build("vit")).describe("classifier.weight_scale") == "`classifier.weight_scale`"
