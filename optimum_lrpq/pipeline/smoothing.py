"""Exact changes of the attention operands before quantization (`quantization.smoothing`), applied to a model.

Key/value centering (`LRPQConfig.center_keys`, `center_values`) and query/key smoothing (`qk_smoothing`) keep the
float model's function and narrow the ranges the q/k/v quantizers must cover. The channel ranges are the q/k/v
outputs' per-channel min/max over the calibration tokens: measured during calibration's observation pass (which
computes the float function), or by a float pass of their own where mixed precision needs them earlier. The shifts
and factors are folded into the converted layers' float weights and biases, which are copies, so the original
modules stay as they were if quantization fails and is rolled back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import LRPQConfig
from ..models import ModelLayout
from ..quantization.smoothing import absmax, midrange, query_key_factors
from .observers import channel_min_max
from .placement import model_device_and_dtype

logger = logging.get_logger(__name__)


@dataclass
class ChannelRange:
    """Per-channel minimum and maximum (float32, on the CPU) of a layer's output over the calibration tokens."""

    minimum: torch.Tensor
    maximum: torch.Tensor

    @classmethod
    def of(cls, output: torch.Tensor) -> ChannelRange:
        low, high = channel_min_max(output.detach().reshape(-1, output.shape[-1]))
        return cls(low.float().cpu(), high.float().cpu())

    def update(self, output: torch.Tensor) -> None:
        seen = ChannelRange.of(output)
        self.minimum = torch.minimum(self.minimum, seen.minimum)
        self.maximum = torch.maximum(self.maximum, seen.maximum)

    def shifted(self, shift: torch.Tensor) -> ChannelRange:
        """The range of the channels after `shift` is subtracted from them."""
        return ChannelRange(self.minimum - shift, self.maximum - shift)

    def scaled(self, factors: torch.Tensor) -> ChannelRange:
        """The range of the channels after they are multiplied by the positive `factors`."""
        return ChannelRange(self.minimum * factors, self.maximum * factors)


@dataclass
class AttentionRanges:
    """The q, k and v projections' output ranges of one block.

    `value_shift`: set on the ranges `fold_attention_changes` returns, the shift it subtracted from the v channels
    (None: v not centred); the output projection's inputs (probabilities · v) lost the same shift.
    """

    query: ChannelRange
    key: ChannelRange
    value: ChannelRange
    value_shift: torch.Tensor | None = None


class AttentionRangeRecorder:
    """Forward hooks recording the q/k/v output ranges of every block of `layout` while the model runs.

    Use it around any pass that computes the float function (a float model, or a converted one still observing);
    `remove` the hooks after it, then read `ranges`.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout) -> None:
        self._layout = layout
        self._seen: dict[str, ChannelRange] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._record(name))
                         for block in layout.blocks for name in block.qkv]

    def _record(self, name: str):
        def hook(module, args, output):
            if name not in self._seen:
                self._seen[name] = ChannelRange.of(output)
            else:
                self._seen[name].update(output)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def ranges(self) -> list[AttentionRanges]:
        missing = [name for block in self._layout.blocks for name in block.qkv if name not in self._seen]
        if missing:
            raise RuntimeError(f"The pass did not reach {', '.join(missing)}; no attention ranges for them.")
        return [AttentionRanges(*(self._seen[name] for name in block.qkv)) for block in self._layout.blocks]


@torch.no_grad()
def attention_ranges(model: nn.Module, layout: ModelLayout, batches: list[torch.Tensor],
                     show_progress: bool = True) -> list[AttentionRanges]:
    """The q/k/v output ranges of every block of `layout`, over every token of `batches`, from the float model."""
    recorder = AttentionRangeRecorder(model, layout)
    try:
        device, dtype = model_device_and_dtype(model)
        for batch in tqdm(batches, desc="Attention ranges", unit="batch", disable=not show_progress):
            model(pixel_values=batch.to(device=device, dtype=dtype))
    finally:
        recorder.remove()
    return recorder.ranges()


def _check_width(layer: nn.Module, shift: torch.Tensor, name: str) -> None:
    if layer.weight.shape[0] != shift.numel():
        raise ValueError(f"{name}: {shift.numel()} channel ranges for {layer.weight.shape[0]} output channels.")


@torch.no_grad()
def center_keys_and_values(model: nn.Module, layout: ModelLayout, ranges: list[AttentionRanges], *,
                           keys: bool = True, values: bool = True,
                           layers: Collection[str] | None = None) -> list[AttentionRanges]:
    """Shift each block's k (and v) channels to their midrange through the biases; v's shift returns through o's.

    Returns the ranges of the centred channels, with the shifts of v (`ranges` is not modified). Only the modules named in `layers` (all
    when None) may change: the quantization passes its converted copies, so a module kept in float
    (`modules_to_not_convert`) is never edited. A block whose projection has no bias to carry the shift (a model
    built without q/k/v bias) or whose layers may not change is left as it is: adding a bias would change the
    checkpoint's tensors.
    """
    def changeable(*names: str) -> bool:
        return layers is None or all(name in layers for name in names)

    skipped, centred = [], []
    for block, block_ranges in zip(layout.blocks, ranges, strict=True):
        block_ranges = replace(block_ranges)
        centred.append(block_ranges)
        key, value, output = (model.get_submodule(name) for name in (block.k, block.v, block.o))
        if keys:
            shift = midrange(block_ranges.key.minimum, block_ranges.key.maximum)
            _check_width(key, shift, block.k)
            if key.bias is None or not changeable(block.k):
                skipped.append(block.k)
            else:
                key.bias.sub_(shift.to(key.bias))
                block_ranges.key = block_ranges.key.shifted(shift)
        if values:
            shift = midrange(block_ranges.value.minimum, block_ranges.value.maximum)
            _check_width(value, shift, block.v)
            if (value.bias is None or output.bias is None or output.weight.shape[1] != shift.numel()
                    or not changeable(block.v, block.o)):
                skipped.append(block.v)
            else:
                value.bias.sub_(shift.to(value.bias))
                # W_o's float weight, not its quantized one: the error left is (W_q - W_o)(PV - m), on the centred
                # inputs that the weight rounding (GPTQ) also minimises against.
                output.bias.add_((output.weight.float() @ shift.to(output.weight.device)).to(output.bias))
                block_ranges.value = block_ranges.value.shifted(shift)
                block_ranges.value_shift = shift
    if skipped:
        logger.info(f"Not centred (no bias to carry the shift, or kept in float): {', '.join(skipped)}.")
    return centred


@torch.no_grad()
def smooth_queries_and_keys(model: nn.Module, layout: ModelLayout, ranges: list[AttentionRanges],
                            alpha: float, layers: Collection[str] | None = None) -> list[AttentionRanges]:
    """Multiply each block's q rows by s and divide its k rows by s (`query_key_factors`), weights and biases.

    Only blocks whose q and k are both named in `layers` (all when None) change (see `center_keys_and_values`).
    Returns the ranges after the change (`ranges` is not modified)."""
    smoothed = []
    for block, block_ranges in zip(layout.blocks, ranges, strict=True):
        block_ranges = replace(block_ranges)
        smoothed.append(block_ranges)
        if layers is not None and not (block.q in layers and block.k in layers):
            continue
        query, key = model.get_submodule(block.q), model.get_submodule(block.k)
        factors = query_key_factors(absmax(block_ranges.query.minimum, block_ranges.query.maximum),
                                    absmax(block_ranges.key.minimum, block_ranges.key.maximum), alpha)
        factors = factors.to(query.weight.device)
        for layer, scale in ((query, factors), (key, factors.reciprocal())):
            _check_width(layer, scale, f"{block.q} / {block.k}")
            layer.weight.mul_(scale.to(layer.weight.dtype)[:, None])
            if layer.bias is not None:
                layer.bias.mul_(scale.to(layer.bias.dtype))
        factors = factors.float().cpu()
        block_ranges.query = block_ranges.query.scaled(factors)
        block_ranges.key = block_ranges.key.scaled(factors.reciprocal())
    return smoothed


def uses_attention_ranges(config: LRPQConfig) -> bool:
    """Whether `config` changes the attention operands (`fold_attention_changes` needs `attention_ranges`)."""
    return bool(config.center_keys or config.center_values or config.qk_smoothing)


def ranges_measurable_in_calibration(config: LRPQConfig) -> bool:
    """Whether calibration can measure the attention ranges during its own pass and correct its observations after.

    What the observers of q/k/v and of the output projection's inputs saw changes by per-channel shifts and factors:
    their min/max follow exactly from the channel ranges, kept samples do not (other range estimators), nor does a
    per-tensor min/max of the output projection's inputs (v's shift differs per channel).
    """
    return config.activation_range == "minmax" and (
        not config.center_values or config.linear_input_granularity == "per_channel")


def fold_attention_changes(model: nn.Module, layout: ModelLayout, ranges: list[AttentionRanges],
                           config: LRPQConfig, layers: Collection[str]) -> list[AttentionRanges]:
    """Centre k and v, then smooth q and k, as `config` says, in the modules named in `layers` (converted copies).

    Returns the q/k/v channel ranges after the changes, with v's shifts. The final quantization and every trial
    quantization of mixed precision call this on their converted layers, so a trial measures the model the same plan
    would give."""
    if config.center_keys or config.center_values:
        ranges = center_keys_and_values(model, layout, ranges, keys=config.center_keys, values=config.center_values,
                                        layers=layers)
    if config.qk_smoothing:  # after centring: the key factors follow the centred ranges
        ranges = smooth_queries_and_keys(model, layout, ranges, float(config.qk_smoothing), layers=layers)
    return ranges
