"""One relevance pass over a model: hooks that put relays into the graph, and the per-image bookkeeping.

Where to steer relevance comes from the model's architecture adapter (``optimum_lrpq.models``: ``ModelLayout``
residual sites, conservation units, heads and their start shares, LayerScales); everything else is found by module
type. How each piece is handled (rules in ``rules.py``):

* ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm`` / activation modules / Swin's ``AdaptiveAvgPool1d`` / the
  layout's LayerScales (elementwise scales, identity rule): a forward hook replaces the output by a relay carrying
  the module's rule.
* attention matmuls and softmax: our registered attention function (``attention.py``).
* residual adds ``y = skip + branch`` (inside the blocks' forward, no module): autograd would copy ``R_y`` to both
  operands. A relay on the branch output (forward hook on the branch's last module, ``ResidualSite.end``)
  receives ``R_y``, applies the residual rule and passes the branch share on. The skip edge still delivers the full
  ``R_y`` to the fork, so a relay on the branch *input* (forward pre-hook on its LayerNorm, ``ResidualSite.start``)
  adds ``R_skip - R_y`` to what the branch returns to the fork. Autograd runs that relay only after everything
  downstream of it, the branch-output relay included, so both values are known by then. The fork then holds
  ``R_skip + R_branch_input`` (clone = sum), as the rule asks.
* everything else between modules (reshapes, windows, slicing, ``cat``, DINOv2's mean over the patch tokens before
  its head) keeps its autograd backward: moves and copies route relevance exactly, and a mean's gradient splits it
  evenly over the tokens, which is conservative.
* conservation units (transformer blocks, Swin patch merging): identity relays on input and output record the total
  relevance crossing them, for conservation checks. The first one also counts the tokens that enter the encoder as
  all-zero vectors: LRP gives a zero input no relevance, so whatever reaches them is lost (see
  ``_check_conservation``).

Cost: one forward that keeps the activations the rules need, and one backward. The relays return their value
without copying it; the Chefer linear rule reuses the forward's output, so it costs three matmuls (a gradient with
respect to the input alone would cost one): alpha1-beta0 needs both signed propagations and its own denominator.

Relevance is computed per image: no rule reduces over the batch, so batching does not change any result.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.utils import logging

from ..models import ModelLayout, ResidualSite
from .attention import ACTIVE_PROBABILITY_RECORDER, ACTIVE_RULES, ATTENTION_KEY
from .layout import quantizable_layers, relevance_layout
from .relay import identity, relay
from .rules import RULE_SETS, ConvGeometry, RuleSet

logger = logging.get_logger(__name__)

_COMPUTE_DTYPE = torch.float32  # rules run in at least fp32 even for half-precision models
_WEIGHT_CHUNK = 1 << 24  # per-weight relevance: at most this many values ([images, out, in]) at a time


def _f(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.to(_COMPUTE_DTYPE)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == "transformers.activations" or isinstance(
        module, (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh)
    )


@dataclass
class RelevanceTrace:
    """Per-image quantities of a relevance pass (tensors of shape [num_images], float64).

    layer_abs / layer_sum: sum |R| and sum R at each quantizable layer's input (0 for a layer relevance never
    reached). operand_abs: sum |R| of the other tensors quantized at a layer's bits (q, k, v: the outputs of
    q/k/v_proj, which the attention quantizes; the probabilities count with v_proj, the operand they multiply; 0
    for every other layer). layer_weight: sum |R_ij| of the per-weight relevance (only if requested). branch: sum R
    entering each residual branch (site name -> values). block_in / block_out: total relevance at each block's input / output.
    start: total start relevance. zero_tokens: how many tokens enter the first block as all-zero vectors (e.g. the
    class and distillation tokens of a DeiT built from a config: transformers initialises them, and its position
    embeddings, to zero); relevance that reaches them is lost, so the encoder input then holds less than ``start``.
    """

    layers: list[str]
    residuals: tuple[ResidualSite, ...]
    blocks: tuple[str, ...]
    layer_abs: dict[str, Tensor]
    layer_sum: dict[str, Tensor]
    operand_abs: dict[str, Tensor]
    layer_weight: dict[str, Tensor] | None
    branch: dict[str, Tensor]
    block_in: dict[str, Tensor]
    block_out: dict[str, Tensor]
    start: Tensor
    zero_tokens: Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.start.numel())


@dataclass
class _SiteState:
    skip: Tensor | None = None
    r_out: Tensor | None = None
    r_skip: Tensor | None = None


@dataclass
class _Session:
    """Rules and per-batch records of a pass; hooks write here, ``run_relevance_pass`` collects."""

    rules: RuleSet
    weight_scores: bool
    batch_size: int = 0
    _batch_index: int = -1
    records: dict[str, dict[str, list[Tensor]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    heads: list[tuple[Tensor, float]] = field(default_factory=list)
    sites: dict[str, _SiteState] = field(default_factory=dict)
    attention_names: dict[int, str] = field(default_factory=dict)  # id(attention module) -> name
    operand_producers: frozenset[str] = frozenset()  # linears whose output the attention quantizes (q/k/v_proj)

    def _by_image(self, t: Tensor) -> tuple[Tensor, torch.dtype]:
        # Tensors are image-major (Swin's windows of one image are contiguous), so a reshape groups by image.
        # Sums accumulate in (at least) float32, without a float64 copy of the tensor; the totals are float64.
        return t.detach().reshape(self.batch_size, -1), torch.float64 if t.dtype == torch.float64 else _COMPUTE_DTYPE

    def per_image(self, t: Tensor) -> Tensor:
        flat, dtype = self._by_image(t)
        return flat.sum(1, dtype=dtype).to(torch.float64)

    def per_image_abs(self, t: Tensor) -> Tensor:
        flat, dtype = self._by_image(t)
        return torch.linalg.vector_norm(flat, ord=1, dim=1, dtype=dtype).to(torch.float64)

    def record(self, kind: str, name: str, values: Tensor) -> None:
        bucket = self.records[kind][name]
        if len(bucket) > self._batch_index:  # a module called twice in one forward: accumulate
            bucket[-1] = bucket[-1] + values.cpu()
        else:
            bucket.append(values.cpu())

    def begin_batch(self, batch_size: int, batch_index: int) -> None:
        self.batch_size, self._batch_index = batch_size, batch_index
        self.heads.clear()
        for state in self.sites.values():
            state.skip = state.r_out = state.r_skip = None

    def record_input_relevance(self, name: str, relevance: Tensor) -> None:
        self.record("abs", name, self.per_image_abs(relevance))
        self.record("sum", name, self.per_image(relevance))

    # ------------------------------------------------------------------------------------------------- rules

    def linear_rule(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor,
                    relevance: Tensor) -> tuple[Tensor]:
        x32, w32, out32, r32 = _f(x), _f(weight), _f(output), _f(relevance)
        b32 = None if bias is None else _f(bias)
        # An output computed in float32 or better can stand in for a matmul of the rule.
        exact = output.dtype in (torch.float32, torch.float64)
        r_in = self.rules.linear(x32, w32, b32, out32, r32, exact)
        self.record_input_relevance(name, r_in)
        if name in self.operand_producers:
            self.record("out_abs", name, self.per_image_abs(r32))
        if self.weight_scores:
            self.record("weight", name, self._linear_weight_totals(x32, w32, b32, out32, r32, exact))
        return (r_in.to(x.dtype),)

    def _linear_weight_totals(self, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor,
                              relevance: Tensor, exact: bool) -> Tensor:
        """Per image: sum |R_ij| of the per-weight relevance, a few images at a time ([images, out, in] each)."""
        b = self.batch_size
        xs, outs, rs = (t.reshape(b, -1, t.shape[-1]) for t in (x, output, relevance))
        step = max(1, _WEIGHT_CHUNK // weight.numel())
        totals = []
        for i in range(0, b, step):
            part = slice(i, i + step)
            per_weight = self.rules.linear_weights(xs[part], weight, bias, outs[part], rs[part], exact)
            totals.append(torch.linalg.vector_norm(per_weight.flatten(1), ord=1, dim=1))
        return torch.cat(totals).to(torch.float64)

    def conv_rule(self, name: str, x: Tensor, weight: Tensor, output: Tensor, geometry: ConvGeometry,
                  relevance: Tensor) -> tuple[Tensor]:
        r_in = self.rules.conv(_f(x), _f(weight), _f(output), _f(relevance), geometry)
        self.record_input_relevance(name, r_in)
        if self.weight_scores:
            values = [
                self.rules.conv_weights(_f(x[i : i + 1]), _f(weight), _f(output[i : i + 1]),
                                        _f(relevance[i : i + 1]), geometry).abs().sum()
                for i in range(x.shape[0])
            ]
            self.record("weight", name, torch.stack(values).to(torch.float64))
        return (r_in.to(x.dtype),)

    def record_probabilities(self, module: nn.Module, relevance: Tensor) -> None:
        """Sum |R| of an attention module's probabilities (called from our attention function)."""
        # Swin batches windows: [images * windows, heads, N, N] is still image-major, as per_image expects.
        self.record("probs", self.attention_names[id(module)], self.per_image_abs(relevance))

    def pool_rule(self, x: Tensor, relevance: Tensor) -> tuple[Tensor]:
        return (self.rules.mean_pool(_f(x), _f(relevance)).to(x.dtype),)

    def total_rule(self, kind: str, name: str, relevance: Tensor) -> tuple[Tensor]:
        self.record(kind, name, self.per_image(relevance))
        return (relevance,)

    def residual_rule(self, site: ResidualSite, state: _SiteState, branch: Tensor, relevance: Tensor) -> tuple[Tensor]:
        r_skip, r_branch = self.rules.residual(_f(state.skip), _f(branch), _f(relevance))
        state.r_out, state.r_skip = relevance, r_skip.to(relevance.dtype)
        self.record("branch", site.name, self.per_image(r_branch))
        return (r_branch.to(relevance.dtype),)

    def skip_correction_rule(self, site: ResidualSite, state: _SiteState, relevance: Tensor) -> tuple[Tensor]:
        if state.r_out is None:
            raise RuntimeError(f"Relevance never reached the residual add after `{site.start}`; the model's forward "
                               "does not match the layout compute_relevance expects.")
        corrected = relevance + (state.r_skip - state.r_out)
        state.skip = state.r_out = state.r_skip = None
        return (corrected,)


# ------------------------------------------------------------------------------------------------------- hooks


def _linear_hook(session: _Session, name: str, head_share: float | None, module: nn.Linear, args, output):
    x = args[0]
    bias = None if module.bias is None else module.bias.detach()
    rule = functools.partial(session.linear_rule, name, x.detach(), module.weight.detach(), bias, output.detach())
    output = relay(rule, output, x)
    if head_share is not None:
        session.heads.append((output, head_share))
    return output


def _conv_hook(session: _Session, name: str, module: nn.Conv2d, args, output):
    x = args[0]
    rule = functools.partial(session.conv_rule, name, x.detach(), module.weight.detach(), output.detach(),
                             ConvGeometry.of(module))
    return relay(rule, output, x)


def _identity_hook(module: nn.Module, args, output):
    return relay(identity, output, args[0])


def _pool_hook(session: _Session, module: nn.AdaptiveAvgPool1d, args, output):
    if module.output_size not in (1, (1,)):
        raise NotImplementedError("Relevance through AdaptiveAvgPool1d is implemented for output_size=1 only.")
    return relay(functools.partial(session.pool_rule, args[0].detach()), output, args[0])


def _site_start_hook(session: _Session, site: ResidualSite, state: _SiteState, module: nn.Module, args):
    x = args[0]
    state.skip = x.detach()
    return (relay(functools.partial(session.skip_correction_rule, site, state), x, x), *args[1:])


def _site_end_hook(session: _Session, site: ResidualSite, state: _SiteState, module: nn.Module, args, output):
    branch = output[0] if isinstance(output, tuple) else output
    branch = relay(functools.partial(session.residual_rule, site, state, branch.detach()), branch, branch)
    return (branch, *output[1:]) if isinstance(output, tuple) else branch


def _block_in_hook(session: _Session, name: str, count_zero_tokens: bool, module: nn.Module, args):
    x = args[0]
    if count_zero_tokens:
        tokens = x.detach().reshape(session.batch_size, -1, x.shape[-1])
        session.record("zero_tokens", name, (tokens == 0).all(-1).sum(1).to(torch.float64).cpu())
    return (relay(functools.partial(session.total_rule, "block_in", name), x, x), *args[1:])


def _block_out_hook(session: _Session, name: str, module: nn.Module, args, output):
    y = output[0] if isinstance(output, tuple) else output
    y = relay(functools.partial(session.total_rule, "block_out", name), y, y)
    return (y, *output[1:]) if isinstance(output, tuple) else y


@contextmanager
def _hooks(model: nn.Module, layout: ModelLayout, session: _Session) -> Iterator[None]:
    """Register every hook of the pass; always remove them."""
    modules = dict(model.named_modules())
    heads = layout.start_shares()
    layer_scales = set(layout.layer_scales)
    handles = []
    try:
        for name, module in modules.items():
            if isinstance(module, nn.Linear):
                hook = functools.partial(_linear_hook, session, name, heads.get(name))
            elif isinstance(module, nn.Conv2d):
                hook = functools.partial(_conv_hook, session, name)
            elif isinstance(module, nn.LayerNorm) or _is_activation(module) or name in layer_scales:
                # LayerScale y = x * lambda: the z-rule gives R_x = x lambda / y * R_y = R_y, the identity
                # (autograd would multiply by lambda and break conservation). It runs before the residual relay
                # registered below on the same module.
                hook = _identity_hook
            elif isinstance(module, nn.AdaptiveAvgPool1d):
                hook = functools.partial(_pool_hook, session)
            else:
                continue
            handles.append(module.register_forward_hook(hook))
        for site in layout.residuals:
            state = session.sites.setdefault(site.name, _SiteState())
            handles.append(modules[site.start].register_forward_pre_hook(
                functools.partial(_site_start_hook, session, site, state)))
            handles.append(modules[site.end].register_forward_hook(
                functools.partial(_site_end_hook, session, site, state)))
        for index, block in enumerate(layout.conservation_units):
            handles.append(modules[block].register_forward_pre_hook(
                functools.partial(_block_in_hook, session, block, index == 0)))
            handles.append(modules[block].register_forward_hook(functools.partial(_block_out_hook, session, block)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def relevance_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and our attention function for the pass; the user's training flags and attention restored after."""
    training = [(module, module.training) for module in model.modules()]
    attention = [(config, config._attn_implementation_internal) for config in _configs(model)]
    try:
        model.eval()
        model.set_attn_implementation(ATTENTION_KEY)
        yield
    finally:
        # Restore the stored values themselves rather than calling set_attn_implementation again: exact, and
        # free of the checks (and warnings) that a switch runs.
        for config, implementation in attention:
            config._attn_implementation_internal = implementation
        for module, flag in training:
            module.training = flag


# -------------------------------------------------------------------------------------------------------- pass


def run_relevance_pass(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    rule: str = "chefer",
    weight_scores: bool = False,
) -> RelevanceTrace:
    """Propagate relevance for each ``(pixel_values, target_or_None)`` batch; None targets the predicted class.

    Low-level: no argument checking beyond the model (see ``compute_relevance``). Also the way to inspect
    conservation: ``trace.block_in`` / ``trace.block_out`` / ``trace.start``.
    """
    layout = relevance_layout(model)
    session = _Session(rules=RULE_SETS[rule](), weight_scores=weight_scores)
    session.attention_names = {id(model.get_submodule(name)): name for name in layout.attentions}
    session.operand_producers = frozenset(name for block in layout.blocks for name in block.qkv)
    parameter = next(model.parameters())
    starts: list[Tensor] = []
    # The pass needs autograd even if the caller runs under no_grad / inference_mode.
    with relevance_mode(model), _hooks(model, layout, session), torch.inference_mode(False), torch.enable_grad():
        for index, (pixel_values, target) in enumerate(batches):
            session.begin_batch(pixel_values.shape[0], index)
            pixels = pixel_values.detach().to(device=parameter.device, dtype=parameter.dtype).clone()
            pixels.requires_grad_(True)
            token = ACTIVE_RULES.set(session.rules)
            recorder_token = ACTIVE_PROBABILITY_RECORDER.set(session.record_probabilities)
            try:
                logits = model(pixel_values=pixels).logits.detach()
                if target is None:
                    target = logits.argmax(-1)
                target = target.to(logits.device)
                heads = list(session.heads)
                one_hot = nn.functional.one_hot(target, logits.shape[-1])
                seeds = [(share * one_hot).to(out.dtype) for out, share in heads]
                # Relevance starts at the target logit(s) and ends at the pixels; no parameter .grad is touched.
                torch.autograd.grad([out for out, _ in heads], [pixels], seeds)
            finally:
                ACTIVE_RULES.reset(token)
                ACTIVE_PROBABILITY_RECORDER.reset(recorder_token)
                session.heads.clear()
            starts.append(torch.full((pixels.shape[0],), float(sum(s for _, s in heads)), dtype=torch.float64))
    trace = _collect(model, layout, session, starts)
    if rule == "chefer":
        _check_conservation(trace)
    return trace


def _check_conservation(trace: RelevanceTrace, tolerance: float = 0.01) -> None:
    """The Chefer rules are conservative down to the encoder input: say where relevance got lost if it did.

    One loss is inherent and harmless: tokens that enter the encoder as all-zero vectors (a DeiT built from a config
    has its class and distillation tokens and position embeddings at zero; trained ones are not) get no relevance,
    since LRP shares relevance in proportion to the inputs, so what reaches them inside the first block is lost. That
    case is only logged at INFO level; any other loss (an unsupported layout, a rule that met exact zeros elsewhere)
    is a warning naming where it happened.
    """
    start, first, last = trace.start, trace.blocks[0], trace.blocks[-1]
    lost = (trace.block_in[first] - start).abs() / start
    total = float(lost.max())
    if total <= tolerance:
        return
    # Units are consecutive in forward order, so the loss splits into the stretch from the heads to the last unit's
    # output and what each unit's input lacks compared with its output.
    differences = {f"between the classification head(s) and the output of `{last}`": trace.block_out[last] - start}
    differences.update({f"inside `{unit}`": trace.block_in[unit] - trace.block_out[unit] for unit in trace.blocks})
    where = [place for place, d in differences.items() if float((d.abs() / start).max()) > tolerance]
    zero_tokens = trace.zero_tokens
    if where == [f"inside `{first}`"] and zero_tokens is not None and bool((zero_tokens[lost > tolerance] > 0).all()):
        count = int(zero_tokens.max())
        logger.info(
            f"Relevance at the encoder input is up to {total:.1%} below the start relevance because {count} "
            f"token(s) enter `{first}` as all-zero vectors, and LRP gives a zero input no relevance. This is what an "
            "untrained model looks like (transformers initialises DeiT's class and distillation tokens and position "
            "embeddings to zero when a model is built from a config); with trained weights (from_pretrained) "
            "relevance is conserved. Nothing to do."
        )
        return
    logger.warning(
        f"Relevance at the encoder input differs from the start relevance by up to {total:.1%}, although the Chefer "
        f"rules conserve it: it is lost {' and '.join(where) or 'across several blocks'}. Relevance-based layer "
        "scores (and the mixed-precision bits chosen from them) may be skewed for this model. If it has trained "
        "weights, please report this with the model class; meanwhile relevance_rule='epsilon' or "
        "mixed_precision=False do not depend on conservation."
    )


def _collect(model: nn.Module, layout: ModelLayout, session: _Session, starts: list[Tensor]) -> RelevanceTrace:
    start = torch.cat(starts)
    n = start.numel()
    records = session.records

    def gather(kind: str, names: Iterable[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            values = records[kind].get(name)
            out[name] = torch.cat(values) if values else torch.zeros(n, dtype=torch.float64)
            if out[name].numel() != n:  # a layer reached in some batches only
                raise RuntimeError(f"Relevance reached `{name}` in some batches only.")
        return out

    layers = quantizable_layers(model, layout)
    operands = {name: torch.zeros(n, dtype=torch.float64) for name in layers}
    outputs = gather("out_abs", layers)
    probabilities = gather("probs", layout.attentions)
    for block in layout.blocks:
        q, k, v = block.qkv
        for name in (q, k, v):
            if name in operands:
                operands[name] = outputs[name].clone()
        if v in operands:
            operands[v] += probabilities[block.attention]
    return RelevanceTrace(
        layers=layers,
        residuals=layout.residuals,
        blocks=layout.conservation_units,
        layer_abs=gather("abs", layers),
        layer_sum=gather("sum", layers),
        operand_abs=operands,
        layer_weight=gather("weight", layers) if session.weight_scores else None,
        branch=gather("branch", [site.name for site in layout.residuals]),
        block_in=gather("block_in", layout.conservation_units),
        block_out=gather("block_out", layout.conservation_units),
        start=start,
        zero_tokens=next(iter(gather("zero_tokens", layout.conservation_units[:1]).values()), None),
    )
