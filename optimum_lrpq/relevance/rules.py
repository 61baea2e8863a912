"""LRP rules as small pure functions on tensors, and the two rule sets built from them.

Notation (method-reference.md §4.2): a layer computes ``z_j = sum_i x_i w_ij (+ b_j)``; ``R_j`` is the relevance at
its output and ``R_i`` at its input; ``x+ = max(x, 0)``, ``x- = min(x, 0)`` and likewise for ``w``.

Every function returns relevance with the shape of the operand it belongs to. No rule reduces across the first
(batch) dimension: "per sample" sums run over all other dimensions, LRP-eps stabilisers over a token's outputs (or
an image's, for convolutions), so a sample's relevance never depends on the rest of its batch. (Swin's window
batches have windows as samples; every window belongs to one image, so per-image semantics hold.)

References:
    Bach et al. 2015, "On pixel-wise explanations ... by layer-wise relevance propagation" (LRP-0/eps, alpha-beta).
    Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor decomposition" (z^B).
    Chefer, Gur, Wolf 2021, "Transformer interpretability beyond attention visualization" (rule set for ViTs:
    alpha1-beta0 linears, z^B patch embedding, half-split matmuls, renormalised residual adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STABILIZER = 1e-9
"""Absolute stabiliser of ``safe_divide`` (the value used by Chefer et al.)."""

EPSILON_REL = 1e-6
"""Relative epsilon of the LRP-eps rule set: eps = EPSILON_REL * mean|z| of the sample."""


def safe_divide(numerator: Tensor, denominator: Tensor, eps: float = STABILIZER) -> Tensor:
    """``numerator / denominator`` with the denominator pushed away from 0 by ``±eps``; 0 where it is exactly 0."""
    out = numerator / (denominator + torch.copysign(denominator.new_tensor(eps), denominator))
    return out.masked_fill_(denominator == 0, 0.0)


def epsilon_divide(
    numerator: Tensor, denominator: Tensor, eps_rel: float = EPSILON_REL, dims: tuple[int, ...] = (-1,)
) -> Tensor:
    """``numerator / (z + eps * sign(z))`` with ``eps = eps_rel * mean|z|`` over ``dims`` (LRP-eps).

    A relative epsilon keeps the rule scale-free. The default (the last dimension: one token's outputs) never mixes
    tokens of different images, and is the same whether a layer sees a batch or one image.
    """
    eps = denominator.abs().mean(dim=dims, keepdim=True).mul_(eps_rel)
    return safe_divide(numerator, denominator + torch.where(denominator >= 0, eps, -eps))


def per_sample_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the first, kept broadcastable against ``t``."""
    return t.flatten(1).sum(1).view(-1, *([1] * (t.dim() - 1)))


# ----------------------------------------------------------------------------------------------------- Linear


_CANCELLATION = 1e-3
"""Below this ratio of the positive part to |x w|, the one-matmul form of alpha1-beta0 is not trusted (rounding)."""


def _alpha1beta0_split(x: Tensor, weight: Tensor, relevance: Tensor, output: Tensor | None, bias: Tensor | None):
    """``x+, x-, w+, w-`` and ``s = R / (x+ w+ + x- w- + eps)`` (the positive contributions of each output), 0 where
    no contribution is positive (its relevance is lost, as with ``safe_divide``)."""
    x_pos, w_pos = x.clamp(min=0), weight.clamp(min=0)
    x_neg, w_neg = x - x_pos, weight - w_pos
    positive = None
    if output is not None:
        # x w + |x| |w| = 2 (x+ w+ + x- w-), with x w = output - bias from the forward: one matmul instead of two
        # (the halving and the sum inside it). Where the positive part is tiny next to |x w|, this subtracts nearly
        # equal numbers and rounding (~1e-7 of |x| |w|) could distort it: rare, and then the exact form is used.
        n_out, n_in = weight.shape
        z = output if bias is None else output - bias
        positive = torch.addmm(z.reshape(-1, n_out), (x_pos - x_neg).reshape(-1, n_in), (w_pos - w_neg).T,
                               beta=0.5, alpha=0.5).view_as(output)
        if torch.lt(positive, z.abs().mul_(_CANCELLATION)).any():
            positive = None
    if positive is None:
        positive = F.linear(x_pos, w_pos).add_(F.linear(x_neg, w_neg))
    # Where no contribution is positive, every term x+ w+ and x- w- of that output is exactly 0 (so is its share of
    # any input), and s is 0.
    positive = positive.add_(STABILIZER)
    s = relevance.div(positive).masked_fill_(positive <= STABILIZER, 0.0)
    return x_pos, x_neg, w_pos, w_neg, s


def linear_alpha1beta0(
    x: Tensor, weight: Tensor, relevance: Tensor, output: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """LRP-alpha1-beta0 for ``z = x @ w.T`` (bias ignored): only activating contributions share ``R_j``.

    ``R_i = sum_j (x_i+ w_ij+ + x_i- w_ij-) / sum_i' (x_i'+ w_i'j+ + x_i'- w_i'j-) * R_j``. The denominator is a
    sum of non-negative terms, so the rule is conservative whenever some contribution is positive. ``output`` (with
    ``bias``, None for a layer without): the layer's real output, if known in at least float32; it saves one of the
    three matmuls.
    """
    x_pos, x_neg, w_pos, w_neg, s = _alpha1beta0_split(x, weight, relevance, output, bias)
    return (s @ w_pos).mul_(x_pos).addcmul_(x_neg, s @ w_neg)


def linear_alpha1beta0_weights(
    x: Tensor, weight: Tensor, relevance: Tensor, output: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Per-weight relevance of ``linear_alpha1beta0`` per sample, summed over its tokens.

    ``x``: [..., tokens, in], ``relevance``: [..., tokens, out]; returns [..., out, in] (leading dimensions are
    samples). ``R_ij = sum_t (x_ti+ w_ij+ + x_ti- w_ij-) s_tj``, whose sum over ``j`` is the input relevance of the
    rule above, so per-weight relevance is conserved too.
    """
    x_pos, x_neg, w_pos, w_neg, s = _alpha1beta0_split(x, weight, relevance, output, bias)
    s_t = s.transpose(-1, -2)
    return (s_t @ x_pos).mul_(w_pos).addcmul_(w_neg, s_t @ x_neg)


def linear_epsilon(x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, eps_rel: float = EPSILON_REL) -> Tensor:
    """LRP-eps: ``R_i = sum_j x_i w_ij / (z_j + eps sign z_j) * R_j`` with ``z`` the real output (bias included).

    The bias takes its share of relevance, so the rule is not conservative (by design of LRP-eps).
    """
    return x * (epsilon_divide(relevance, output, eps_rel) @ weight)


def linear_epsilon_weights(
    x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, eps_rel: float = EPSILON_REL
) -> Tensor:
    """Per-weight relevance of ``linear_epsilon`` per sample ([..., tokens, features] tensors), summed over tokens:
    [..., out, in]."""
    return (epsilon_divide(relevance, output, eps_rel).transpose(-1, -2) @ x).mul_(weight)


# ----------------------------------------------------------------------------------------------------- Conv2d


@dataclass(frozen=True)
class ConvGeometry:
    """The arguments of ``F.conv2d`` besides input and weight."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> ConvGeometry:
        if isinstance(conv.padding, str):
            raise NotImplementedError("LRP for Conv2d with string padding is not implemented.")
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def is_patchify(self, weight_shape: torch.Size) -> bool:
        """Non-overlapping patches (stride = kernel, no padding, dilation or groups), as in every ViT patch
        embedding: the convolution is a linear layer on the patches, and its transposes are matmuls plus reshapes
        (much faster on CPU than the generic convolution backward)."""
        return (self.stride == tuple(weight_shape[-2:]) and self.padding == (0, 0) and self.dilation == (1, 1)
                and self.groups == 1)

    def backward_input(self, input_shape: torch.Size, weight: Tensor, s: Tensor) -> Tensor:
        """Transpose of ``forward`` w.r.t. its input, applied to ``s``."""
        if not self.is_patchify(weight.shape):
            return torch.nn.grad.conv2d_input(input_shape, weight, s, self.stride, self.padding, self.dilation,
                                              self.groups)
        b, c, h, w = input_shape
        out, _, kh, kw = weight.shape
        nh, nw = s.shape[-2:]
        patches = s.permute(0, 2, 3, 1).reshape(-1, out) @ weight.reshape(out, -1)  # [b * nh * nw, c * kh * kw]
        image = patches.view(b, nh, nw, c, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * kh, nw * kw)
        if (nh * kh, nw * kw) != (h, w):  # border pixels that no patch covers (the convolution drops them)
            image = F.pad(image, (0, w - nw * kw, 0, h - nh * kh))
        return image

    def backward_weight(self, x: Tensor, weight_shape: torch.Size, s: Tensor) -> Tensor:
        """``sum over positions (and batch) of x_i s_j`` per weight entry."""
        if not self.is_patchify(weight_shape):
            return torch.nn.grad.conv2d_weight(x, weight_shape, s, self.stride, self.padding, self.dilation,
                                               self.groups)
        out, c, kh, kw = weight_shape
        b, nh, nw = x.shape[0], *s.shape[-2:]
        patches = x[..., : nh * kh, : nw * kw].reshape(b, c, nh, kh, nw, kw).permute(0, 2, 4, 1, 3, 5)
        return (s.permute(1, 0, 2, 3).reshape(out, -1) @ patches.reshape(-1, c * kh * kw)).view(weight_shape)


def pixel_bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image lowest and highest input value, as tensors shaped like ``x`` (the box of the z^B rule)."""
    low = x.flatten(1).amin(1).view(-1, *([1] * (x.dim() - 1))).expand_as(x).contiguous()
    high = x.flatten(1).amax(1).view(-1, *([1] * (x.dim() - 1))).expand_as(x).contiguous()
    return low, high


def _zb_terms(x: Tensor, weight: Tensor, relevance: Tensor, geometry: ConvGeometry):
    low, high = pixel_bounds(x)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    # z = sum_i x_i w_ij - l_i w_ij+ - h_i w_ij- = sum_i w+ (x - l) + w- (x - h) >= 0: conservative, no bias.
    z = geometry.forward(x, weight) - geometry.forward(low, w_pos) - geometry.forward(high, w_neg)
    return low, high, w_pos, w_neg, safe_divide(relevance, z)


def conv2d_zb(x: Tensor, weight: Tensor, relevance: Tensor, geometry: ConvGeometry) -> Tensor:
    """z^B rule (bounded input box [l, h], per image) for the patch embedding; bias ignored.

    ``R_i = sum_j (x_i w_ij - l_i w_ij+ - h_i w_ij-) / sum_i' (x_i' w_i'j - l_i' w_i'j+ - h_i' w_i'j-) * R_j``.
    """
    low, high, w_pos, w_neg, s = _zb_terms(x, weight, relevance, geometry)
    back = geometry.backward_input
    return x * back(x.shape, weight, s) - low * back(x.shape, w_pos, s) - high * back(x.shape, w_neg, s)


def conv2d_zb_weights(x: Tensor, weight: Tensor, relevance: Tensor, geometry: ConvGeometry) -> Tensor:
    """Per-weight relevance of ``conv2d_zb`` for one image (batch of 1), summed over positions."""
    low, high, w_pos, w_neg, s = _zb_terms(x, weight, relevance, geometry)
    back = geometry.backward_weight
    return (weight * back(x, weight.shape, s) - w_pos * back(low, weight.shape, s)
            - w_neg * back(high, weight.shape, s))


_CHW = (1, 2, 3)  # a conv output's stabiliser scale is taken per image


def conv2d_epsilon(
    x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, geometry: ConvGeometry, eps_rel: float = EPSILON_REL
) -> Tensor:
    """LRP-eps for a convolution; ``output`` is the real output (bias included)."""
    return x * geometry.backward_input(x.shape, weight, epsilon_divide(relevance, output, eps_rel, _CHW))


def conv2d_epsilon_weights(
    x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, geometry: ConvGeometry, eps_rel: float = EPSILON_REL
) -> Tensor:
    """Per-weight relevance of ``conv2d_epsilon`` for one image (batch of 1), summed over positions."""
    return weight * geometry.backward_weight(x, weight.shape, epsilon_divide(relevance, output, eps_rel, _CHW))


# ------------------------------------------------------------------------------------------------ Matmul, add, pool


def matmul_half_split(
    a: Tensor, b: Tensor, relevance: Tensor, eps_rel: float = 0.0, z: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """z-rule (LRP-0, or LRP-eps if ``eps_rel > 0``) on both operands of ``Z = a @ b``, each getting one half.

    ``R_a = 1/2 a * ((R/Z) b^T)`` and ``R_b = 1/2 b * (a^T (R/Z))``. Each product sums to ``1/2 sum R``, so the pair
    conserves relevance (Chefer et al. 2021, einsum relprop followed by the halving in the attention relprop).
    ``z``: ``a @ b`` if already known.
    """
    z = a @ b if z is None else z
    s = epsilon_divide(relevance, z, eps_rel) if eps_rel > 0 else safe_divide(relevance, z)
    s = s.mul_(0.5)
    return (s @ b.transpose(-1, -2)).mul_(a), (a.transpose(-1, -2) @ s).mul_(b)


def residual_add_renormalized(skip: Tensor, branch: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Chefer et al.'s rule for ``y = skip + branch``: z-rule, then rescale each part per sample.

    With ``a = skip R/y``, ``b = branch R/y``: ``a <- a * |sum a| / (|sum a| + |sum b|) * sum R / sum a`` (same for
    ``b``), so the two parts sum exactly to ``sum R`` and are split in proportion to their absolute totals.
    """
    s = safe_divide(relevance, skip + branch)
    r_skip, r_branch = skip * s, s.mul_(branch)
    total = per_sample_sum(relevance)
    sum_skip, sum_branch = per_sample_sum(r_skip), per_sample_sum(r_branch)
    norm = sum_skip.abs() + sum_branch.abs()
    r_skip = r_skip.mul_(safe_divide(safe_divide(sum_skip.abs(), norm) * total, sum_skip))
    r_branch = r_branch.mul_(safe_divide(safe_divide(sum_branch.abs(), norm) * total, sum_branch))
    return r_skip, r_branch


def residual_add_epsilon(
    skip: Tensor, branch: Tensor, relevance: Tensor, eps_rel: float = EPSILON_REL
) -> tuple[Tensor, Tensor]:
    """LRP-eps for ``y = skip + branch``: ``R_skip = skip R / (y + eps)``, no renormalisation."""
    s = epsilon_divide(relevance, skip + branch, eps_rel)
    return skip * s, branch * s


def mean_pool_alpha1beta0(x: Tensor, relevance: Tensor) -> Tensor:
    """alpha1-beta0 for the mean over the last dimension (weights 1/T > 0): ``R_i = x_i+ / sum x+ * R``.

    A row without any positive entry would lose its relevance; it is split uniformly instead, to stay conservative.
    """
    x_pos = x.clamp(min=0)
    z = x_pos.sum(-1, keepdim=True)
    uniform = (relevance / x.shape[-1]).expand_as(x)
    return torch.where(z > 0, x_pos * safe_divide(relevance, z), uniform)


def mean_pool_epsilon(x: Tensor, relevance: Tensor, eps_rel: float = EPSILON_REL) -> Tensor:
    """LRP-eps for the mean over the last dimension: ``R_i = x_i / (sum x + eps) * R``."""
    return x * epsilon_divide(relevance, x.sum(-1, keepdim=True), eps_rel)


# --------------------------------------------------------------------------------------------------- Rule sets


class RuleSet:
    """Which rule each component follows. LayerNorm, GELU, softmax, dropout and LayerScale are identity in both
    sets.

    ``linear``: ``output`` is the layer's real output (bias included); ``exact`` says whether the forward computed
    it in at least float32, so that a rule may use it in place of a matmul of its own.
    """

    name: str = ""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor, relevance: Tensor,
               exact: bool = False) -> Tensor:
        raise NotImplementedError

    def linear_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor, relevance: Tensor,
                       exact: bool = False) -> Tensor:
        raise NotImplementedError

    def conv(self, x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, geometry: ConvGeometry) -> Tensor:
        raise NotImplementedError

    def conv_weights(
        self, x: Tensor, weight: Tensor, output: Tensor, relevance: Tensor, geometry: ConvGeometry
    ) -> Tensor:
        raise NotImplementedError

    def matmul(self, a: Tensor, b: Tensor, relevance: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def residual(self, skip: Tensor, branch: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def mean_pool(self, x: Tensor, relevance: Tensor) -> Tensor:
        raise NotImplementedError


class CheferRules(RuleSet):
    """Chefer et al. 2021 (method-reference.md §4.2): conservative from the logits down to the pixels."""

    name = "chefer"

    def linear(self, x, weight, bias, output, relevance, exact=False):
        return linear_alpha1beta0(x, weight, relevance, output if exact else None, bias)

    def linear_weights(self, x, weight, bias, output, relevance, exact=False):
        return linear_alpha1beta0_weights(x, weight, relevance, output if exact else None, bias)

    def conv(self, x, weight, output, relevance, geometry):
        return conv2d_zb(x, weight, relevance, geometry)

    def conv_weights(self, x, weight, output, relevance, geometry):
        return conv2d_zb_weights(x, weight, relevance, geometry)

    def matmul(self, a, b, relevance, z=None):
        return matmul_half_split(a, b, relevance, z=z)

    def residual(self, skip, branch, relevance):
        return residual_add_renormalized(skip, branch, relevance)

    def mean_pool(self, x, relevance):
        return mean_pool_alpha1beta0(x, relevance)


class EpsilonRules(RuleSet):
    """LRP-eps everywhere a layer has weights (biases absorb relevance), eps-stabilised half-split matmuls,
    eps z-rule at residual adds (no renormalisation)."""

    name = "epsilon"

    def __init__(self, eps_rel: float = EPSILON_REL) -> None:
        self.eps_rel = eps_rel

    def linear(self, x, weight, bias, output, relevance, exact=False):
        return linear_epsilon(x, weight, output, relevance, self.eps_rel)

    def linear_weights(self, x, weight, bias, output, relevance, exact=False):
        return linear_epsilon_weights(x, weight, output, relevance, self.eps_rel)

    def conv(self, x, weight, output, relevance, geometry):
        return conv2d_epsilon(x, weight, output, relevance, geometry, self.eps_rel)

    def conv_weights(self, x, weight, output, relevance, geometry):
        return conv2d_epsilon_weights(x, weight, output, relevance, geometry, self.eps_rel)

    def matmul(self, a, b, relevance, z=None):
        return matmul_half_split(a, b, relevance, self.eps_rel, z)

    def residual(self, skip, branch, relevance):
        return residual_add_epsilon(skip, branch, relevance, self.eps_rel)

    def mean_pool(self, x, relevance):
        return mean_pool_epsilon(x, relevance, self.eps_rel)


RULE_SETS: dict[str, type[RuleSet]] = {"chefer": CheferRules, "epsilon": EpsilonRules}
