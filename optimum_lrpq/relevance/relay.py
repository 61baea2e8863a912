"""The one autograd trick the propagation is built on.

Relevance travels backwards through the autograd graph *in the gradient slot*: the "gradient" reaching a tensor is
its relevance. Every operation whose real gradient is not a valid LRP rule is replaced, in the graph only, by a
relay: a node whose forward value is the true output and whose backward applies an LRP rule. Operations that only
move or copy values (view, transpose, roll, window partition, cat, slicing, padding) keep their own backward, which
already routes relevance correctly; so does a fork (autograd sums the relevance of all consumers: the clone rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Rule = Callable[[Tensor], Sequence[Tensor | None]]


class _Relay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule: Rule, output: Tensor, *inputs: Tensor) -> Tensor:
        ctx.rule = rule
        # Returned as is: autograd makes it a view owned by this node, without copying the values, and refuses any
        # in-place change to it (which would also change the tensors the rule captured).
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        rule, ctx.rule = ctx.rule, None  # drop the tensors captured by the rule as soon as it has run
        return (None, None, *rule(relevance))


def relay(rule: Rule, output: Tensor, *inputs: Tensor) -> Tensor:
    """``output``'s value, as a function of ``inputs`` whose backward maps output relevance to input relevance.

    ``rule(relevance_of_output)`` must return one tensor (or None) per input, shaped like it. Capture only
    detached tensors in ``rule``: the original graph of ``output`` is dropped here.
    """
    return _Relay.apply(rule, output.detach(), *inputs)


def identity(relevance: Tensor) -> tuple[Tensor]:
    """The identity rule (LayerNorm, GELU, softmax, LayerScale): relevance passes unchanged."""
    return (relevance,)
