"""Attention function that makes q @ k^T, softmax and A @ v follow the LRP rules.

transformers computes these inside a module-level function picked through ``AttentionInterface``
(hf-integration.md §15), so module hooks cannot reach them. We register our own function under a dedicated key;
``compute_relevance`` switches the model to it for the pass and restores the user's choice afterwards. Its forward
equals transformers' eager attention; the relevance pass in progress is found through a context variable.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from ..nn.attention import eager_attention
from .relay import relay
from .rules import RuleSet

ATTENTION_KEY = "lrpq_relevance"

ACTIVE_RULES: ContextVar[RuleSet | None] = ContextVar("lrpq_relevance_rules", default=None)
"""The rule set of the relevance pass in progress (None outside of one)."""

ACTIVE_PROBABILITY_RECORDER: ContextVar[Callable[[nn.Module, Tensor], None] | None] = ContextVar(
    "lrpq_probability_recorder", default=None)
"""Called with (attention module, relevance of its probabilities) during a pass, if set."""


def relevance_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention whose backward (during a relevance pass) applies the LRP matmul rule twice.

    Relevance of the output goes half to the probabilities and half to v (``A @ v``); the probabilities' share
    passes softmax, the additive mask/bias and the 1/sqrt(d) scaling unchanged (identity; the mask absorbs none)
    and is split half/half between q and k (``q @ k^T``). Net: v 1/2, q 1/4, k 1/4 (method-reference.md §4.2).
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    rules = ACTIVE_RULES.get()
    if rules is None:  # not in a relevance pass: behave exactly like eager attention
        output, probs = eager_attention(module, query, key, value, attention_mask, scaling, dropout)
        return output.transpose(1, 2).contiguous(), probs

    with torch.no_grad():  # the graph is made of relays only
        output, probs = eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    q, k, v = query.detach(), key.detach(), value.detach()
    # probs @ v is the output: reused when computed in float32 or better. q @ k^T is recomputed (cheap) rather than
    # kept: it is as large as the probabilities.
    product = output if query.dtype in (torch.float32, torch.float64) else None

    def scores_rule(relevance: Tensor) -> tuple[Tensor, Tensor]:
        r_q, r_kt = rules.matmul(q.float(), k.float().transpose(-1, -2), relevance.float())
        return r_q.to(q.dtype), r_kt.transpose(-1, -2).to(k.dtype)

    recorder = ACTIVE_PROBABILITY_RECORDER.get()

    def output_rule(relevance: Tensor) -> tuple[Tensor, Tensor]:
        r_probs, r_v = rules.matmul(probs.float(), v.float(), relevance.float(), product)
        if recorder is not None:
            recorder(module, r_probs)
        return r_probs.to(probs.dtype), r_v.to(v.dtype)

    probs_in_graph = relay(scores_rule, probs, query, key)
    output = relay(output_rule, output, probs_in_graph, value)
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION_KEY, relevance_attention_forward)
