"""LRP relevance: the rules on hand-computed toy tensors, conservation through whole models, and the contract of
`compute_relevance` (keys, normalisation, determinism, batching, model left untouched, errors)."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.vit.modeling_vit import eager_attention_forward

from optimum_lrpq.models import get_adapter, supported_models
from optimum_lrpq.relevance import (
    ATTENTION_KEY,
    SUPPORTED_MODELS,
    compute_relevance,
    layer_scores,
    quantizable_layers,
    relevance_trace,
)
from optimum_lrpq.relevance import rules as R
from optimum_lrpq.relevance.attention import ACTIVE_PROBABILITY_RECORDER, ACTIVE_RULES, relevance_attention_forward

T = torch.tensor


def tensor_close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


MODEL_NAMES = tiny_models.MODEL_NAMES
VIT_LIKE = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "num_labels": 5}
build = tiny_models.build
pixels = tiny_models.pixels


def realistic(name: str, seed: int = 0) -> nn.Module:
    """A tiny model whose class/distillation tokens and position embeddings are not zero (HF initialises some of
    them to zero; a zero token has a zero LayerNorm output, where alpha1-beta0 legitimately loses relevance), and
    whose DINOv2 LayerScales are not all 1 (so that a wrong rule through them would show)."""
    model = build(name, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith(("cls_token", "distillation_token", "position_embeddings")):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            if pname.endswith("lambda1"):  # LayerScale
                param.copy_(0.05 + 2 * torch.rand(param.shape, generator=generator))
    return model


# ------------------------------------------------------------------------------------ rules on toy tensors


def test_safe_divide_is_zero_where_the_denominator_is():
    tensor_close(R.safe_divide(T([1.0, 2.0, 3.0]), T([0.0, 2.0, -4.0])), [0.0, 1.0, -0.75])


def test_linear_alpha1beta0_by_hand():
    # z_j = sum_i x_i w_ji. Out 0: contributions 1, (-1)(-2)=2, 2 -> all activating, Z=5.
    # Out 1: 2, (-1)(1)=-1 (inhibiting: dropped), 6 -> Z=8.  R_out = [1, 2].
    x, w, r = T([1.0, -1.0, 2.0]), T([[1.0, -2.0, 1.0], [2.0, 1.0, 3.0]]), T([1.0, 2.0])
    expected = [1 / 5 + 2 * 2 / 8, 2 / 5, 2 / 5 + 2 * 6 / 8]  # = [0.7, 0.4, 1.9]
    tensor_close(R.linear_alpha1beta0(x, w, r), expected)
    # Per-weight relevance sums to the input relevance column-wise, and to R_out row-wise.
    per_weight = R.linear_alpha1beta0_weights(x[None], w, r[None])
    tensor_close(per_weight, [[1 / 5, 2 / 5, 2 / 5], [2 * 2 / 8, 0.0, 2 * 6 / 8]])


def test_linear_alpha1beta0_from_the_forward_output_equals_the_two_matmul_form():
    # With the layer's output known, x+ w+ + x- w- = (x w + |x| |w|) / 2 needs one matmul: same relevance.
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 16), torch.randn(24, 16), torch.randn(24)
    out, rel = nn.functional.linear(x, w, b), torch.rand(2, 7, 24)
    tensor_close(R.linear_alpha1beta0(x, w, rel, out, b), R.linear_alpha1beta0(x, w, rel), tol=1e-5)
    tensor_close(R.linear_alpha1beta0_weights(x, w, rel, out, b), R.linear_alpha1beta0_weights(x, w, rel), tol=1e-5)
    tensor_close(R.linear_alpha1beta0(x, w, rel).sum(), rel.sum(), tol=1e-4)  # conservative
    # An output whose positive part is tiny next to |x w| (one small positive weight among negative ones): the
    # one-matmul form would lose it to rounding, so the exact form is used; same relevance.
    xp, wt = x.abs(), torch.cat([-w[:1].abs(), w[1:]])
    wt[0, 0] = 1e-4
    out = nn.functional.linear(xp, wt, b)
    tensor_close(R.linear_alpha1beta0(xp, wt, rel, out, b), R.linear_alpha1beta0(xp, wt, rel), tol=1e-5)
    tensor_close(R.linear_alpha1beta0(xp, wt, rel, out, b).sum(), rel.sum(), tol=1e-4)
    # An output without any positive contribution (x >= 0, its weights <= 0) passes nothing on, in both forms.
    x, w = x.abs(), torch.cat([-w[:1].abs(), w[1:]])
    out = nn.functional.linear(x, w, b)
    for r_in in (R.linear_alpha1beta0(x, w, rel, out, b), R.linear_alpha1beta0(x, w, rel)):
        assert torch.isfinite(r_in).all()
        tensor_close(r_in.sum(), rel[..., 1:].sum(), tol=1e-4)


def test_linear_epsilon_by_hand_includes_the_bias():
    x, w, b, r = T([1.0, -1.0, 2.0]), T([[1.0, -2.0, 1.0], [2.0, 1.0, 3.0]]), T([0.5, -1.0]), T([1.0, 2.0])
    out = x @ w.T + b  # [5.5, 6.0]
    expected = T([1.0, 2.0, 2.0]) / 5.5 + T([2.0, -1.0, 6.0]) / 6.0 * 2
    tensor_close(R.linear_epsilon(x[None], w, out[None], r[None], eps_rel=1e-9)[0], expected, tol=1e-6)
    per_weight = R.linear_epsilon_weights(x[None], w, out[None], r[None], eps_rel=1e-9)
    tensor_close(per_weight.sum(0), expected, tol=1e-6)


def test_conv_zb_by_hand_with_per_image_bounds():
    # One 2x2 patch, one output channel. l=-1, h=1. Terms x w - l w+ - h w-: 2, 2, 3, 0.5 (Z = 7.5).
    x = T([[[[1.0, -1.0], [0.5, 0.0]]]])
    w = T([[[[1.0, -1.0], [2.0, 0.5]]]])
    geometry = R.ConvGeometry(stride=(2, 2))
    expected = T([[[[2.0, 2.0], [3.0, 0.5]]]]) / 7.5
    tensor_close(R.conv2d_zb(x, w, T([[[[1.0]]]]), geometry), expected)
    # A second image at twice the scale has twice the bounds, hence the same relevance: bounds are per image.
    both = R.conv2d_zb(torch.cat([x, 2 * x]), w, T([[[[1.0]]], [[[1.0]]]]), geometry)
    tensor_close(both, torch.cat([expected, expected]))
    tensor_close(R.conv2d_zb_weights(x, w, T([[[[1.0]]]]), geometry), expected)


def test_conv_weight_relevance_sums_to_input_relevance():
    torch.manual_seed(0)
    x, w = torch.randn(1, 3, 8, 8), torch.randn(5, 3, 4, 4)
    geometry = R.ConvGeometry(stride=(4, 4))
    out = nn.functional.conv2d(x, w, stride=4)
    rel = torch.rand_like(out)
    for rel_in, per_weight in [
        (R.conv2d_zb(x, w, rel, geometry), R.conv2d_zb_weights(x, w, rel, geometry)),
        (R.conv2d_epsilon(x, w, out, rel, geometry), R.conv2d_epsilon_weights(x, w, out, rel, geometry)),
    ]:
        tensor_close(per_weight.sum(), rel_in.sum(), tol=1e-4)
    tensor_close(R.conv2d_zb(x, w, rel, geometry).sum(), rel.sum(), tol=1e-4)  # z^B is conservative


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"),
                         [((2, 3, 16, 16), 4, 4, 0), ((2, 3, 18, 17), 4, 4, 0), ((2, 3, 9, 9), 3, 2, 1)])
def test_conv_transposes_match_the_generic_convolution_backward(shape, kernel, stride, padding):
    # Patch embeddings (stride = kernel, no padding) take a matmul path; any border the patches miss gets 0.
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(5, shape[1], kernel, kernel)
    geometry = R.ConvGeometry(stride=(stride, stride), padding=(padding, padding))
    s = torch.randn_like(geometry.forward(x, w))
    assert geometry.is_patchify(w.shape) == (stride == kernel and padding == 0)
    tensor_close(geometry.backward_input(x.shape, w, s),
                 torch.nn.grad.conv2d_input(x.shape, w, s, (stride, stride), (padding, padding)), tol=1e-4)
    tensor_close(geometry.backward_weight(x, w.shape, s),
                 torch.nn.grad.conv2d_weight(x, w.shape, s, (stride, stride), (padding, padding)), tol=1e-4)


def test_matmul_half_split_by_hand():
    a, b, r = T([[1.0, 2.0]]), T([[3.0], [4.0]]), T([[1.0]])  # Z = 11
    r_a, r_b = R.matmul_half_split(a, b, r)
    tensor_close(r_a, [[3 / 22, 8 / 22]])
    tensor_close(r_b, [[3 / 22], [8 / 22]])
    torch.manual_seed(0)
    a, b, r = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 3, 5), torch.randn(2, 4, 5, 5)
    r_a, r_b = R.matmul_half_split(a, b, r)
    tensor_close(r_a.sum(), 0.5 * r.sum(), tol=1e-4)
    tensor_close(r_b.sum(), 0.5 * r.sum(), tol=1e-4)


def test_residual_add_renormalized_by_hand():
    # z-rule: s = R / (skip + branch) = [1, 2]; skip part [1, 6] (sum 7), branch part [1, -2] (sum -1); total 6.
    # Renormalised: skip gets 7/8 * 6 = 5.25, branch 1/8 * 6 = 0.75, each keeping its own pattern.
    skip, branch, r = T([[1.0, 3.0]]), T([[1.0, -1.0]]), T([[2.0, 4.0]])
    r_skip, r_branch = R.residual_add_renormalized(skip, branch, r)
    tensor_close(r_skip, [[0.75, 4.5]])
    tensor_close(r_branch, [[-0.75, 1.5]])
    # Per sample: a second sample does not change the first one's split.
    r_skip2, _ = R.residual_add_renormalized(torch.cat([skip, 5 * skip]), torch.cat([branch, -branch]),
                                             torch.cat([r, r]))
    tensor_close(r_skip2[:1], r_skip)


def test_residual_add_epsilon_is_the_plain_z_rule():
    r_skip, r_branch = R.residual_add_epsilon(T([[1.0, 3.0]]), T([[1.0, -1.0]]), T([[2.0, 4.0]]), eps_rel=1e-12)
    tensor_close(r_skip, [[1.0, 6.0]])
    tensor_close(r_branch, [[1.0, -2.0]])


def test_mean_pool_alpha1beta0_by_hand():
    tensor_close(R.mean_pool_alpha1beta0(T([[[1.0, -1.0, 3.0]]]), T([[[2.0]]])), [[[0.5, 0.0, 1.5]]])
    # No positive entry: split uniformly rather than lose the relevance.
    tensor_close(R.mean_pool_alpha1beta0(T([[[-1.0, -2.0]]]), T([[[2.0]]])), [[[1.0, 1.0]]])


# --------------------------------------------------------------------------------------- attention function


def test_attention_function_matches_eager_in_and_out_of_a_pass():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.randn(1, 3, 5, 5)
    module = nn.Module().eval()
    expected, expected_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.5)
    out, probs = relevance_attention_forward(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(probs, expected_probs)
    token = ACTIVE_RULES.set(R.CheferRules())
    try:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, _ = relevance_attention_forward(module, qg, kg, vg, mask, scaling=0.5)
        torch.testing.assert_close(out, expected)
        rel = torch.rand_like(out)
        r_q, r_k, r_v = torch.autograd.grad(out, [qg, kg, vg], rel)
    finally:
        ACTIVE_RULES.reset(token)
    # v gets 1/2, q and k 1/4 each; the mask absorbs nothing.
    tensor_close(r_v.sum(), 0.5 * rel.sum(), tol=1e-4)
    tensor_close(r_q.sum(), 0.25 * rel.sum(), tol=1e-4)
    tensor_close(r_k.sum(), 0.25 * rel.sum(), tol=1e-4)


def test_attention_function_reports_the_relevance_of_the_probabilities():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    module = nn.Module().eval()
    seen = []
    tokens = ACTIVE_RULES.set(R.CheferRules()), ACTIVE_PROBABILITY_RECORDER.set(lambda m, r: seen.append((m, r)))
    try:
        out, probs = relevance_attention_forward(module, q, k, v, None, scaling=0.5)
        rel = torch.rand_like(out)
        r_q, r_k, _ = torch.autograd.grad(out, [q, k, v], rel)
    finally:
        ACTIVE_RULES.reset(tokens[0])
        ACTIVE_PROBABILITY_RECORDER.reset(tokens[1])
    assert len(seen) == 1 and seen[0][0] is module
    r_probs = seen[0][1]
    assert r_probs.shape == probs.shape
    # By hand: the matmul rule gives A @ v's operand A the relevance A_ij v_jd / z_id R_id, halved.
    z = probs @ v.detach()
    expected = 0.5 * probs * ((rel.transpose(1, 2) / z) @ v.detach().transpose(-1, -2))
    tensor_close(r_probs, expected, tol=1e-4)
    # ... and all of it passes on to q and k.
    tensor_close(r_q.sum() + r_k.sum(), r_probs.sum(), tol=1e-4)


# --------------------------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conservation_per_block_and_at_the_encoder_input(name):
    model = realistic(name)
    trace = relevance_trace(model, [pixels(4)])
    tensor_close(trace.start, torch.ones(4, dtype=torch.float64))
    for block in trace.blocks:
        tensor_close(trace.block_in[block], trace.block_out[block], tol=1e-4)
    tensor_close(trace.block_in[trace.blocks[0]], trace.start, tol=1e-4)  # encoder input = start relevance
    # Each residual branch's relevance is a part of its block's relevance.
    assert all(torch.isfinite(v).all() for v in trace.branch.values())


@pytest.mark.parametrize("half", ["cls", "mean"])
def test_dinov2_relevance_reaches_the_encoder_through_both_halves_of_the_head_input(half):
    # The head reads concat(CLS token, mean of the patch tokens). With the other half's weights zeroed, all the
    # relevance has to flow (by autograd: slicing, mean, cat) through this half, and is still conserved.
    model = realistic("dinov2")
    hidden = model.config.hidden_size
    other_half = slice(hidden, None) if half == "cls" else slice(0, hidden)
    with torch.no_grad():
        model.classifier.weight[:, other_half] = 0.0
    trace = relevance_trace(model, [pixels(3)])
    last = trace.blocks[-1]
    tensor_close(trace.block_out[last], trace.start, tol=1e-4)
    tensor_close(trace.block_in[trace.blocks[0]], trace.start, tol=1e-4)


def _records(caplog, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == level and r.name.startswith("optimum_lrpq")]


def test_untrained_deit_with_teacher_loses_only_the_zero_tokens_share_and_says_so_quietly(caplog):
    # Built from a config, DeiT's class and distillation tokens and position embeddings are zero (transformers'
    # init): both tokens enter the encoder as zero vectors, and LRP gives a zero input no relevance.
    model = build("deit_teacher")
    with caplog.at_level("INFO"):
        trace = relevance_trace(model, [pixels(4)])
    assert _records(caplog, "WARNING") == []  # nothing a user could act on
    [info] = _records(caplog, "INFO")
    assert "2 token(s) enter `deit.layers.0` as all-zero vectors" in info and "from_pretrained" in info
    # The rule's sums: both heads start with 1/2, all of it reaches the encoder output, every block but the first
    # conserves it, and only the first loses some (what reached the two zero tokens).
    tensor_close(trace.start, torch.ones(4, dtype=torch.float64))
    tensor_close(trace.block_out[trace.blocks[-1]], trace.start, tol=1e-4)
    for block in trace.blocks[1:]:
        tensor_close(trace.block_in[block], trace.block_out[block], tol=1e-4)
    first = trace.blocks[0]
    assert trace.zero_tokens.tolist() == [2.0] * 4
    assert bool((trace.block_in[first] < 0.99 * trace.start).all())
    # Give the same model non-zero tokens (as training would): the loss is gone, and so is the message.
    caplog.clear()
    with torch.no_grad():
        model.deit.embeddings.cls_token.normal_(0, 0.5)
        model.deit.embeddings.distillation_token.normal_(0, 0.5)
    with caplog.at_level("INFO"):
        trace = relevance_trace(model, [pixels(4)])
    assert trace.zero_tokens.tolist() == [0.0] * 4
    tensor_close(trace.block_in[first], trace.start, tol=1e-4)
    assert _records(caplog, "INFO") == [] and _records(caplog, "WARNING") == []


def test_relevance_lost_elsewhere_is_a_warning_naming_where(caplog):
    # Block 1's attention branch sees a zero input (LayerNorm scaled to 0) but still adds o_proj's bias, so the
    # residual rule sends relevance into a branch with nothing to give it to.
    model = realistic("vit")
    with torch.no_grad():
        model.vit.layers[1].layernorm_before.weight.zero_()
        model.vit.layers[1].layernorm_before.bias.zero_()
        model.vit.layers[1].attention.o_proj.bias.fill_(1.0)
    with caplog.at_level("WARNING"):
        compute_relevance(model, [pixels(2)])
    [warning] = _records(caplog, "WARNING")
    assert "differs from the start relevance" in warning and "it is lost inside `vit.layers.1`." in warning
    assert "relevance_rule='epsilon'" in warning


def test_label_target_and_predicted_target_agree_when_labels_are_predictions():
    model, x = realistic("vit"), pixels(4)
    with torch.no_grad():
        predicted = model(pixel_values=x).logits.argmax(-1)
    by_prediction = compute_relevance(model, [x])
    assert compute_relevance(model, [x], target="label", labels=[predicted]) == by_prediction
    other = compute_relevance(model, [x], target="label", labels=[(predicted + 1) % 5])
    assert other != by_prediction


# ------------------------------------------------------------------------------------------- public contract


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_scores_cover_every_quantizable_layer(name):
    model = realistic(name)
    for score, rule in [("operands", "chefer"), ("linear_abs", "chefer"), ("branch", "chefer"), ("weight", "epsilon")]:
        scores = compute_relevance(model, [pixels(3)], score=score, rule=rule)
        # Exactly the adapter layout's quantizable weight layers, in named_modules() order.
        weight_layers = get_adapter(model).layout(model).weight_layers()
        assert set(scores) == set(weight_layers) and len(scores) == len(weight_layers)
        assert list(scores) == [n for n, _ in model.named_modules() if n in scores] == quantizable_layers(model)
        # Here that is every Linear and Conv2d of the model.
        assert list(scores) == [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert all(v >= 0 for v in scores.values())
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-9)
    if name == "deit_teacher":
        assert {"cls_classifier", "distillation_classifier"} <= set(scores)
    if name == "swin":
        assert "swin.encoder.layers.0.downsample.reduction" in scores


@pytest.mark.parametrize("name", ["vit", "swin", "dinov2"])
def test_operand_relevance_is_recorded_on_q_k_v_only(name):
    model = realistic(name)
    trace = relevance_trace(model, [pixels(3)])
    layout = get_adapter(model).layout(model)
    qkv = {n for block in layout.blocks for n in block.attention_linears[:3]}
    assert qkv and qkv <= set(trace.layers)
    for layer in trace.layers:
        values = trace.operand_abs[layer]
        assert values.shape == (3,)
        assert bool((values > 0).all()) if layer in qkv else bool((values == 0).all()), layer
    scores = compute_relevance(model, [pixels(3)], score="operands")
    by_hand = layer_scores(trace, "linear_abs")  # same images: the operands score adds operand_abs per image
    totals = torch.stack([trace.layer_abs[n] + trace.operand_abs[n] for n in trace.layers], 1)
    shares = (totals / totals.sum(1, keepdim=True)).mean(0)
    assert scores == pytest.approx(dict(zip(trace.layers, shares.tolist(), strict=True)), abs=1e-9)
    assert scores != pytest.approx(by_hand, abs=1e-6)


def test_branch_score_gives_a_branch_one_value():
    scores = compute_relevance(realistic("vit"), [pixels(2)], score="branch")
    attention = {scores[f"vit.layers.0.attention.{p}_proj"] for p in "qkvo"}
    assert len(attention) == 1
    assert scores["vit.layers.0.mlp.fc1"] == scores["vit.layers.0.mlp.fc2"]


def test_deterministic():
    model, x = realistic("swin"), pixels(4)
    assert compute_relevance(model, [x]) == compute_relevance(model, [x])


@pytest.mark.parametrize(("name", "score"), [("vit", "linear_abs"), ("swin", "linear_abs"), ("swin", "operands"),
                                             ("dinov2", "operands"),
                                             ("deit_teacher", "branch"), ("swin", "weight"),
                                             ("dinov2", "linear_abs"), ("dinov2", "weight")])
def test_batching_does_not_change_the_result(name, score):
    model, x = realistic(name), pixels(4)
    together = compute_relevance(model, [x], score=score)
    one_by_one = compute_relevance(model, list(x.split(1)), score=score)
    assert together.keys() == one_by_one.keys()
    for key in together:
        assert together[key] == pytest.approx(one_by_one[key], abs=1e-5), key


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_left_exactly_as_it_was(attn):
    model = realistic("swin")
    model.set_attn_implementation(attn)
    model.train()
    model.swin.encoder.layers[0].blocks[0].mlp.eval()  # a mixed training state must survive too
    model.classifier.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    compute_relevance(model, [pixels(2)], score="weight", show_progress=True)
    assert model.config._attn_implementation == attn
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.training == flag for m, flag in flags)
    assert all(p.requires_grad == flag and p.grad is None for p, flag in grads)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_model_restored_after_an_exception():
    model = realistic("vit")
    wrong_size = torch.randn(1, 3, 16, 16)  # ViT refuses images of another size
    with pytest.raises(ValueError, match="doesn't match model"):
        compute_relevance(model, [pixels(1), wrong_size])
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_left_on_the_relevance_key_the_model_still_runs_like_eager():
    model, x = realistic("vit"), pixels(2)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        model.set_attn_implementation(ATTENTION_KEY)
        torch.testing.assert_close(model(pixel_values=x).logits, reference)


# ------------------------------------------------------------------------------------------------------ errors


def test_choice_tables_match_the_implementations():
    """The option table (`optimum_lrpq.options`) the config validates against is what the relevance code offers."""
    from optimum_lrpq.options import RELEVANCE_RULES, RELEVANCE_SCORES
    from optimum_lrpq.relevance.rules import RULE_SETS
    from optimum_lrpq.relevance.scores import SCORE_REDUCERS

    assert set(RULE_SETS) == set(RELEVANCE_RULES)
    assert set(SCORE_REDUCERS) == set(RELEVANCE_SCORES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "logit"}, "target must be one of .*got 'logit'"),
        ({"score": "grad"}, "score must be one of .*got 'grad'"),
        ({"rule": "alpha2beta1"}, "rule must be one of .*got 'alpha2beta1'"),
        ({"target": "label"}, 'target="label" needs labels'),
        ({"target": "label", "labels": []}, "labels ran out"),
        ({"target": "label", "labels": [T([0]), T([1])]}, "more entries than the 1 batches"),
        ({"target": "label", "labels": [T([7])]}, r"must lie in \[0, 5\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_relevance(realistic("vit"), [pixels(1)], **kwargs)


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [([], ValueError, "batches is empty"), ([torch.zeros(0, 3, 32, 32)], ValueError, "holds no images"),
     ([torch.zeros(3, 32, 32)], ValueError, "expected \\[images, channels"),
     (pixels(1), TypeError, "got one tensor"), (["image.png"], TypeError, "expected a pixel_values tensor")],
)
def test_bad_batches(batches, error, message):
    model = realistic("vit")
    with pytest.raises(error, match=message):
        compute_relevance(model, batches)
    assert model.config._attn_implementation == "sdpa"


def test_supported_models_come_from_the_adapter_registry():
    assert SUPPORTED_MODELS == tuple(supported_models(with_head=True))
    assert "Dinov2ForImageClassification" in SUPPORTED_MODELS
    assert "Dinov2Model" in supported_models() and "Dinov2Model" not in SUPPORTED_MODELS


def test_a_backbone_without_head_is_refused_clearly():
    config = Dinov2Config(**{k: v for k, v in VIT_LIKE.items() if k != "num_labels"})
    with pytest.raises(ValueError, match="needs a classification head.*Dinov2Model"):
        compute_relevance(Dinov2Model(config).eval(), [pixels(1)])


def test_a_head_without_labels_is_refused_clearly():
    model = ViTForImageClassification(ViTConfig(**{**VIT_LIKE, "num_labels": 0})).eval()
    with pytest.raises(ValueError, match="needs a Linear classification head"):
        compute_relevance(model, [pixels(1)])


def test_unsupported_model_lists_the_supported_ones():
    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=8, vocab_size=10))
    with pytest.raises(ValueError, match="BertForSequenceClassification.*SwinForImageClassification"):
        compute_relevance(bert, [pixels(1)])
