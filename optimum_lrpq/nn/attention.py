"""The `lrpq` attention function and the quantizers it uses.

transformers computes softmax and both attention matmuls inside a module-level function chosen through
`AttentionInterface` (SDPA hides them altogether), so module hooks cannot reach them. We register our own
function under a dedicated key; it reads the quantizers from the attention module it is called with, so their
state lives in the model's state dict. The attention output is quantized by the input quantizer of `o_proj`,
which sees exactly that tensor, so it is not quantized twice here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activation import ActivationQuantizer, LogQuantizer, PerHeadQuantizer, UniformQuantizer

try:  # what a model's `output_attentions` / `output_hidden_states` forward is collecting (transformers >= 5)
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:  # another transformers: every probabilities tensor is kept, as eager attention does
    _OUTPUT_COLLECTOR = None

ATTENTION_KEY = "lrpq"
QUANTIZER_NAMES = ("q_quant", "k_quant", "v_quant", "softmax_quant")

# Inference computes attention a few images at a time, in place: [batch, heads, tokens, tokens] scores are the
# largest activations of a ViT (60 MB at batch 32 for ViT-Base), and each fresh tensor that size costs ~25 ms of page
# faults on a 2-core CPU while a pass over a block that stays in cache costs a few. About this many score elements
# (float32) per block.
IN_PLACE_BLOCK_ELEMENTS = 1 << 20

# "auto" uses the log√2 quantizer below this many bits and the uniform one from it on. A log quantizer's relative
# step near p = 1 is √2 whatever the bits (extra bits only reach smaller probabilities), while 8-bit uniform steps
# are 1/255: on the benchmark models 8-bit uniform probabilities recover 0.4-0.5 points at W8A8/W4A8 (Swin, DeiT)
# and log√2 wins at 4-6 bits (RepQ-ViT's setting).
UNIFORM_SOFTMAX_FROM_BITS = 7
# ... and the log2 one up to this many bits (checkpoint format >= LOG2_SOFTMAX_FROM_FORMAT; log√2 before). b-bit log√2
# levels reach down to 2**(-(2**b - 1) / 2) of the top one: 0.088 at 3 bits, above the ~1/N probability of most of
# N >= 65 tokens, so nearly every probability becomes 0; log2 levels reach 2**-(2**b - 1) = 0.0078. On the real-weight
# benchmark models W4A3 measured 10.0-11.5 % with log√2 and 33.5-35.4 % with log2, W3A3 10.1-10.4 % and 18.7-21.9 %
# (benchmarks/README.md). From 4 bits log√2 reaches 0.0055 and keeps its finer steps near 1.
LOG2_SOFTMAX_UP_TO_BITS = 3
LOG2_SOFTMAX_FROM_FORMAT = 5


def resolve_softmax_quantizer(softmax_quantizer: str, bits: int, format_version: int | None = None) -> str:
    """The quantizer "auto" stands for at `bits` in checkpoints of `format_version` (None: the current format);
    other names are returned unchanged."""
    if softmax_quantizer != "auto":
        return softmax_quantizer
    if bits >= UNIFORM_SOFTMAX_FROM_BITS:
        return "uniform"
    if bits <= LOG2_SOFTMAX_UP_TO_BITS and (format_version is None or format_version >= LOG2_SOFTMAX_FROM_FORMAT):
        return "log2"
    return "log_sqrt2"


def add_attention_quantizers(attention: nn.Module, bits: int, softmax_quantizer: str, device=None,
                             per_head: bool = False, format_version: int | None = None) -> None:
    """Attach q/k/v (uniform, per tensor or per head) and post-softmax quantizers to an attention module
    (`format_version`: of the checkpoint being made or loaded, for what "auto" means; None: the current one)."""
    for name in ("q_quant", "k_quant", "v_quant"):
        quant = (PerHeadQuantizer(bits, attention.num_attention_heads, device=device) if per_head
                 else UniformQuantizer(bits, device=device))
        setattr(attention, name, quant)
    softmax_quantizer = resolve_softmax_quantizer(softmax_quantizer, bits, format_version)
    if softmax_quantizer == "uniform":
        attention.softmax_quant = UniformQuantizer(bits, device=device)
    else:
        attention.softmax_quant = LogQuantizer(bits, sqrt2=softmax_quantizer == "log_sqrt2", device=device)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    probs_quant=_identity) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `eager_attention_forward` (the same in ViT, DeiT, Swin and DINOv2) before its final transpose:
    `(probs @ value, probs)`, with `probs_quant` applied to the probabilities. The one attention body shared by the
    quantized attention function and the relevance pass."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        # Swin passes its relative-position bias (+ shift mask) here; it stays in floating point.
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs_quant(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value), probs


def lrpq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with quantized q, k, v and attention probabilities ([batch, heads, tokens, dim] inputs)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if _in_place_applies(module, query, key, value, attention_mask, dropout):
        return _attention_in_place(module, query, key, value, attention_mask, scaling)
    query = getattr(module, "q_quant", _identity)(query)
    key = getattr(module, "k_quant", _identity)(key)
    value = getattr(module, "v_quant", _identity)(value)
    output, probs = eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                                    probs_quant=getattr(module, "softmax_quant", _identity))
    return output.transpose(1, 2).contiguous(), probs


def _in_place_applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float) -> bool:
    """Whether the blockwise in-place path gives the same values: float32 inference (no autograd, no dropout), every
    quantizer calibrated (no observer), a mask that is per batch item or shared, and eager execution (a compiler
    fuses the plain path by itself)."""
    if torch.compiler.is_compiling() or (dropout and module.training) or query.dim() != 4:
        return False
    tensors = (query, key, value) if attention_mask is None else (query, key, value, attention_mask)
    if any(t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, query.shape[0])):
        return False
    for name in QUANTIZER_NAMES:
        quant = getattr(module, name, None)
        if quant is not None and (not isinstance(quant, ActivationQuantizer) or quant.observer is not None
                                  or quant.learning):
            return False
    return True


def probabilities_requested() -> bool:
    """Whether the running forward pass collects attention probabilities (`output_attentions=True`).

    transformers 5 collects them from the attention modules' outputs while a model's forward runs, through a context
    variable of its output-capturing decorator; a forward that does not ask for them has a collector without an
    attentions entry. True wherever that cannot be read: outside such a forward (an attention module called on its
    own), or with a transformers that has no such collector."""
    if _OUTPUT_COLLECTOR is None:
        return True
    try:
        collecting = _OUTPUT_COLLECTOR.get()
    except Exception:  # noqa: BLE001  (an internal of transformers: any change means "keep them")
        return True
    return not isinstance(collecting, dict) or any("attention" in name for name in collecting)


def _attention_in_place(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lrpq_attention_forward` for inference, a block of batch items at a time: the same operations on the same
    values (each item's products do not depend on the others), with the scores scaled, masked, normalised and
    quantized in place in the probabilities tensor that is returned.

    Where nobody collects the probabilities (`probabilities_requested`), they are not kept: each block is computed in
    one reused buffer that stays in cache, and None is returned in their place (what transformers' attention modules
    pass on). A whole [batch, heads, tokens, tokens] tensor per layer is the largest allocation of a ViT forward (60 MB
    for ViT-Base at batch 32), and writing its fresh pages made the q·kᵀ product twice as slow as the probabilities·v
    one on a 2-core EPYC."""
    batch, heads, tokens, _ = query.shape
    keys, value_dim = key.shape[2], value.shape[3]
    step = max(1, IN_PLACE_BLOCK_ELEMENTS // max(1, heads * tokens * keys))
    kept = probabilities_requested()
    probs = torch.empty(batch if kept else min(batch, step), heads, tokens, keys, dtype=torch.float32,
                        device=query.device)
    output = torch.empty(batch, tokens, heads, value_dim, dtype=torch.float32, device=query.device)
    q_quant, k_quant, v_quant, softmax_quant = (getattr(module, name, _identity) for name in QUANTIZER_NAMES)
    # A power-of-two scaling (head_dim 64: 1/8) commutes exactly with every rounding of the product, so it is applied
    # to the fresh quantized q block instead of the three-times-larger scores: the same values, a smaller pass.
    scale_query = isinstance(q_quant, ActivationQuantizer) and math.frexp(scaling)[0] == 0.5
    for start in range(0, batch, step):
        end = min(batch, start + step)
        scores = probs[start:end] if kept else probs[: end - start]
        q = q_quant(query[start:end])
        if scale_query:
            q.mul_(scaling)
        torch.matmul(q, k_quant(key[start:end]).transpose(2, 3), out=scores)
        if not scale_query:
            scores.mul_(scaling)
        if attention_mask is not None:
            scores.add_(attention_mask if attention_mask.shape[0] == 1 else attention_mask[start:end])
        torch.softmax(scores, dim=-1, out=scores)
        if softmax_quant is not _identity:
            softmax_quant.fake_quantize_(scores)
        output[start:end] = torch.matmul(scores, v_quant(value[start:end])).transpose(1, 2)
    return output, probs if kept else None
