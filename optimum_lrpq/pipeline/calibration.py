"""Calibration: observe activations, reparameterize post-LayerNorm grids, quantize weights, fix all grids.

Operates on a model already converted with `conversion.convert_model(..., skeleton=False)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import LRPQConfig
from ..models import ModelLayout
from ..nn import ActivationQuantizer, PackedWeightLayer, QuantConv2d, QuantLayerNorm, QuantLinear, UniformQuantizer
from ..quantization.clipping import clip_channel_scales
from ..quantization.gptq import gptq_quantize
from ..quantization.reparameterization import reparameterize, search_fold_strength
from .observers import ActivationObserver
from .placement import model_device_and_dtype
from .reconstruction import reconstruct_blocks
from .smoothing import AttentionRangeRecorder, AttentionRanges, ChannelRange, fold_attention_changes

logger = logging.get_logger(__name__)


def attach_observers(model: nn.Module, config: LRPQConfig, num_batches: int,
                     mlp_hidden: frozenset[int] = frozenset()) -> list[ActivationObserver]:
    """An observer on every activation quantizer; those whose id is in `mlp_hidden` use `config.mlp_hidden_range`.

    `mlp_hidden_range` clips within each channel; with too few tokens for per-channel ranges those quantizers fall
    back to one tensor-level grid from `activation_range`, since a tensor-level clip would cut whole outlier channels
    (on DINOv2-S they carry information).
    """
    observers = []
    layernorm_quants = {id(m.out_quant) for m in model.modules() if isinstance(m, QuantLayerNorm)}
    # `activation_step_groups` constrains the per-channel linear inputs (o_proj, fc2) only: not the LayerNorm outputs
    # (reparameterized into one step) nor the per-head q/k/v grids.
    linear_inputs = {id(m.input_quant) for m in model.modules()
                     if isinstance(m, QuantLinear) and m.input_quant is not None}
    for index, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, ActivationQuantizer):
            per_channel = module.per_channel
            mlp = id(module) in mlp_hidden
            method = config.mlp_hidden_range if mlp else config.activation_range
            keep = method != "minmax" or (
                (config.clipping == "ccq_a" or _searches_fold(config)) and id(module) in layernorm_quants
            )
            step_groups = config.activation_step_groups if per_channel and id(module) in linear_inputs else None
            module.observer = ActivationObserver(name, per_channel, method, num_batches,
                                                 seed=config.seed + index, keep_samples=keep,
                                                 fallback_method=config.activation_range if mlp else None,
                                                 step_groups=step_groups)
            observers.append(module.observer)
    return observers


def input_quantizer_ids(model: nn.Module, names) -> frozenset[int]:
    """ids of the input quantizers of the layers `names` (those that have one)."""
    quantizers = (getattr(model.get_submodule(name), "input_quant", None) for name in names)
    return frozenset(id(quant) for quant in quantizers if quant is not None)


def mlp_hidden_quantizers(model: nn.Module, layout: ModelLayout) -> frozenset[int]:
    """ids of the input quantizers of each block's fc2 ( its input is the post-GELU hidden state)."""
    return input_quantizer_ids(model, (block.fc2 for block in layout.blocks))


def head_input_quantizers(model: nn.Module, layout: ModelLayout) -> frozenset[int]:
    """ids of the classifier heads' input quantizers."""
    return input_quantizer_ids(model, layout.heads)


def _searches_fold(config: LRPQConfig) -> bool:
    return config.reparameterize and isinstance(config.fold_strength, list)


def layernorm_grid(quant: UniformQuantizer, config: LRPQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel grid of a post-LayerNorm quantizer, with the configured clipping (CCQ) applied."""
    clip_percentile = config.clipping_percentile if config.clipping == "ccq_a" else None
    scale, zero_point = quant.observer.uniform_grid(quant.bits, clip_percentile=clip_percentile)
    if config.clipping == "ccq_b":
        scale = clip_channel_scales(scale, config.clipping_ratio)
    return scale, zero_point


@torch.no_grad()
def run_batches(model: nn.Module, batches: list[torch.Tensor], description: str, show_progress: bool = True) -> None:
    device, dtype = model_device_and_dtype(model)
    for batch in tqdm(batches, desc=description, unit="batch", disable=not show_progress):
        model(pixel_values=batch.to(device=device, dtype=dtype))


class InputMoments:
    """Running sums of a weight layer's input rows x (the vectors a weight row is multiplied with): Σx, Σxxᵀ, count.

    Σxxᵀ is the costliest part of the calibration pass (in_features² per token: fc2's alone exceeds the whole block's
    forward), so only its block upper triangle is accumulated (blocks of `BLOCK` columns: 62.5 % of the products
    for fc2's 3072 inputs) and mirrored once at the end. It stays float32: a bfloat16 product, 2x faster on CPUs with
    AVX512-BF16, rounds its output and made H indefinite on a random ViT-Base.
    """

    BLOCK = 768

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sum_outer: torch.Tensor | None = None  # block upper triangle only until `second_moment`
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        if self.sum is None:
            width = rows.shape[1]
            self.sum = torch.zeros(width, dtype=torch.float32, device=rows.device)
            self.sum_outer = torch.zeros(width, width, dtype=torch.float32, device=rows.device)
        self.sum += rows.sum(dim=0)
        for start in range(0, rows.shape[1], self.BLOCK):
            end = start + self.BLOCK
            self.sum_outer[start:end, start:].addmm_(rows[:, start:end].T, rows[:, start:])
        self.count += rows.shape[0]

    def shift(self, shift: torch.Tensor) -> None:
        """Turn the sums into those of the rows x - `shift`: Σ(x-m)(x-m)ᵀ = Σxxᵀ - m(Σx)ᵀ - (Σx)mᵀ + n·mmᵀ.

        In float64 for the cancellation (a channel's mean can be several times its spread). The correction is
        symmetric, so adding it to the whole matrix leaves the block upper triangle right."""
        m = shift.double().to(self.sum.device)
        total = self.sum.double()
        correction = self.count * torch.outer(m, m) - torch.outer(m, total) - torch.outer(total, m)
        self.sum_outer.copy_(self.sum_outer.double() + correction)
        self.sum.copy_(total - self.count * m)

    def _full_outer(self) -> torch.Tensor:
        upper = self.sum_outer.triu()
        return upper + upper.triu(1).T

    def second_moment(self, ratio: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """E[x xᵀ], or E[x' x'ᵀ] of the reparameterized input x' = x / ratio − shift."""
        if shift is None or not bool(shift.any()):
            # Nothing cancels without a shift: float32, in place (fc2's 3072² moments took ~10 float64 passes).
            moment = self._full_outer().div_(self.count)
            if ratio is not None:
                inv = 1.0 / ratio.float().to(moment.device)
                moment.mul_(inv[:, None]).mul_(inv[None, :])
            return moment
        moment = self._full_outer().double() / self.count
        mean = self.sum.double() / self.count
        if ratio is not None:
            inv = 1.0 / ratio.double().to(moment.device)
            moment = moment * inv[:, None] * inv[None, :]
            mean = mean * inv
        shift = shift.double().to(moment.device)
        moment = moment - torch.outer(mean, shift) - torch.outer(shift, mean)
        return (moment + torch.outer(shift, shift)).float()


def attach_moment_hooks(model: nn.Module, layout: ModelLayout, skip: frozenset[str] = frozenset()
                        ) -> tuple[dict[str, InputMoments], list]:
    """Forward pre-hooks recording the input moments of every not yet frozen weight layer (for GPTQ), but those in
    `skip` (rounded another way: block reconstruction).

    The consumers of one LayerNorm (q, k, v) see the same input and share one record. Memory: in_features² floats
    per record (ViT-Base: about 0.4 GB in all, mostly the fc2 inputs).
    """
    shared = {consumer: group.consumers[0] for group in layout.groups for consumer in group.consumers}
    moments: dict[str, InputMoments] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, PackedWeightLayer) or module.is_frozen or name in skip:
            continue
        if isinstance(module, QuantConv2d) and module.groups != 1:
            continue
        owner = shared.get(name, name)
        if owner in moments:
            moments[name] = moments[owner]
            continue
        moments[name] = InputMoments()

        def hook(mod, args, acc=moments[name]):
            x = args[0]
            if isinstance(mod, QuantConv2d):
                cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                acc.add(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
            else:
                acc.add(x.reshape(-1, x.shape[-1]))

        handles.append(module.register_forward_pre_hook(hook))
    return moments, handles


def set_layernorm_grids(model: nn.Module, layout: ModelLayout, config: LRPQConfig) -> dict[str, tuple]:
    """Fix each quantized LayerNorm's output grid; with `reparameterize`, fold it into the affine and consumers.

    Returns {consumer name: (ratio, shift)} of the folds, x' = x / ratio − shift.
    """
    folds = {}
    for group in layout.groups:
        layernorm = model.get_submodule(group.layernorm)
        if not isinstance(layernorm, QuantLayerNorm):
            continue
        quant = layernorm.out_quant
        scale, zero_point = layernorm_grid(quant, config)
        observer, quant.observer = quant.observer, None
        if not config.reparameterize:
            quant.set_grid(scale, zero_point)
            continue
        consumers = [model.get_submodule(name) for name in group.consumers]
        weights = [c.weight.data for c in consumers]
        biases = [c.bias.data if c.bias is not None else None for c in consumers]
        alpha = config.fold_strength
        if isinstance(alpha, list):
            alpha, errors = search_fold_strength(observer.samples(), scale, zero_point, weights, biases, alpha,
                                                 quant.bits, [getattr(c, "weight_bits", None) for c in consumers], config.weight_range)
            logger.debug(f"{group.layernorm}: fold strength {alpha} (errors {[f'{e:.3g}' for e in errors]})")
        result = reparameterize(scale, zero_point, layernorm.weight.data, layernorm.bias.data, weights, biases,
                                alpha=alpha, bits=quant.bits)
        layernorm.weight.data.copy_(result.layernorm_weight)
        layernorm.bias.data.copy_(result.layernorm_bias)
        for consumer, weight, bias in zip(consumers, result.linear_weights, result.linear_biases):
            consumer.weight.data.copy_(weight)
            consumer.bias.data.copy_(bias)
        quant.set_grid(result.scale, result.zero_point)
        folds.update({name: (result.ratio, result.shift) for name in group.consumers})
    return folds


# A per-channel linear input needs this many observed tokens: a channel's min/max over n rows is exceeded by about
# 1/(n+1) of new values, so with fewer rows (e.g. 16 tiny images) clipping on unseen images outweighs the finer
# steps. Below it the channels share the tensor-level grid (same checkpoint layout).
MIN_ROWS_PER_CHANNEL = 1024
# A classifier head sees one vector per image, and its per-channel input wins from 32 of them (the default
# calibration set): the final LayerNorm's few wide channels cost more in shared 4-bit steps than the clipping of
# unseen values does (real DINOv2-S W4A4: 68.6 -> 75.1 %, the real-weight DeiT 61.3 -> 63.9 %; benchmarks/README.md).
MIN_HEAD_ROWS = 32


def finalize_activation_grids(model: nn.Module, num_images: int | None = None,
                              head_inputs: frozenset[int] = frozenset()) -> None:
    """Fix every activation quantizer's grid from its observer (and drop the observer).

    A per-channel quantizer that saw fewer than `MIN_ROWS_PER_CHANNEL` tokens (`MIN_HEAD_ROWS` for those whose id is
    in `head_inputs`) gets one range shared by its channels, with a warning; given `num_images` (how many calibration
    images the observers saw), the warning says how many images would have been enough.
    """
    too_few_rows = []
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) and module.observer is not None:
            observer = module.observer
            min_rows = MIN_HEAD_ROWS if id(module) in head_inputs else MIN_ROWS_PER_CHANNEL
            if observer.per_channel and observer.rows < min_rows:
                too_few_rows.append((observer, min_rows))
            module.set_grid_from(observer, min_rows=min_rows)
            module.observer = None
    if too_few_rows:
        logger.warning(_too_few_rows_message(too_few_rows, num_images))


def images_for_channel_ranges(rows: int, num_images: int, min_rows: int = MIN_ROWS_PER_CHANNEL) -> int:
    """How many calibration images give `min_rows` tokens at `rows / num_images` tokens per image."""
    return -(-min_rows * num_images // rows)  # ceil(min_rows / tokens per image)


def _too_few_rows_message(short: list[tuple[ActivationObserver, int]], num_images: int | None) -> str:
    """The warning for per-channel quantizers that fell back to one range: (observer, rows it needed) pairs."""
    def images_needed(item: tuple[ActivationObserver, int]) -> float:
        observer, min_rows = item
        return min_rows / observer.rows if observer.rows else float("inf")

    fewest, min_rows = max(short, key=images_needed)
    others = f" and {len(short) - 1} other(s)" if len(short) > 1 else ""
    heads_only = all(m == MIN_HEAD_ROWS for _, m in short)
    option = "head_input_granularity" if heads_only else "linear_input_granularity"
    message = (f"Per-channel input quantizer {fewest.name}{others} saw only {fewest.rows} tokens during calibration, "
               f"too few for a range per channel (needs {min_rows}), so their channels share one range. ")
    if not num_images or not fewest.rows:
        return message + f"Calibrate on more images, or set {option}='per_tensor'."
    per_image = fewest.rows / num_images
    needed = images_for_channel_ranges(fewest.rows, num_images, min_rows)
    return message + (
        f"At {per_image:g} tokens per image that takes {needed} calibration images instead of {num_images}: pass at "
        f"least {needed} images with num_calibration_samples={needed} (`--num-samples {needed}` on the command "
        f"line), or set {option}='per_tensor'."
    )


def freeze_weights(model: nn.Module, range_method: str,
                   hessian_of: Callable[[str], torch.Tensor | None] | None = None,
                   shared_input_of: Callable[[str], object] | None = None) -> None:
    """Quantize every remaining float weight; `hessian_of(name)` (GPTQ) gives a layer's input second moments.

    Layers with the same `shared_input_of(name)` key (q, k and v read one input) are rounded in one GPTQ solve:
    their rows are independent given the shared H, so this only saves the repeated factorisation and sweep.
    """
    groups: dict[object, list[tuple[str, PackedWeightLayer]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedWeightLayer) and not module.is_frozen:
            key = shared_input_of(name) if shared_input_of is not None else name
            groups.setdefault(key, []).append((name, module))
    for members in groups.values():
        hessian = hessian_of(members[0][0]) if hessian_of is not None else None
        if hessian is None or len(members) == 1:
            for name, module in members:
                module.freeze(range_method, hessian=hessian if len(members) == 1 else None)
            continue
        grids = [module.weight_grid(range_method) for _, module in members]
        bits = torch.cat([torch.full((rows.shape[0],), float(module.weight_bits))
                          for (rows, _, _), (_, module) in zip(grids, members)])
        rounded = gptq_quantize(torch.cat([g[0] for g in grids]), hessian.to(grids[0][0].device),
                                torch.cat([g[1] for g in grids]), torch.cat([g[2] for g in grids]), bits)
        for part, (_, scale, zero_point), (_, module) in zip(rounded.split([g[0].shape[0] for g in grids]), grids,
                                                              members):
            module.store(part, scale, zero_point)


def _head_ranges(channels: ChannelRange, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max over each of `groups` consecutive runs of channels (heads; one group: the whole tensor)."""
    return channels.minimum.reshape(groups, -1).amin(dim=1), channels.maximum.reshape(groups, -1).amax(dim=1)


def correct_attention_observations(model: nn.Module, layout: ModelLayout, measured: list[AttentionRanges],
                                   changed: list[AttentionRanges], moments: dict[str, InputMoments]) -> None:
    """Make a pass that observed the attention operands before `fold_attention_changes` read as if it came after.

    The q/k/v quantizers' observers take the min/max of the changed channels (their grids are per head or per
    tensor: the reduction of the channel ranges); v's shift is subtracted from the output projection's input
    observer and input moments (probabilities sum to one, so its inputs lose exactly that shift).
    """
    for block, before, after in zip(layout.blocks, measured, changed, strict=True):
        attention = model.get_submodule(block.attention)
        for attr, name, raw, new in (("q_quant", block.q, before.query, after.query),
                                     ("k_quant", block.k, before.key, after.key),
                                     ("v_quant", block.v, before.value, after.value)):
            observer = getattr(getattr(attention, attr, None), "observer", None)
            if observer is None:
                continue
            groups = observer.low.numel()
            low, high = _head_ranges(raw, groups)
            # The correction is exact only if the quantizer saw the projection's outputs as they are.
            if not (torch.allclose(low, observer.low.cpu(), rtol=1e-6, atol=1e-6)
                    and torch.allclose(high, observer.high.cpu(), rtol=1e-6, atol=1e-6)):
                raise RuntimeError(f"{block.attention}.{attr} observed other values than the outputs of {name}; the "
                                   "attention changes cannot be folded after calibration for this architecture.")
            observer.replace_range(*_head_ranges(new, groups))
        if after.value_shift is None:
            continue
        observer = getattr(getattr(model.get_submodule(block.o), "input_quant", None), "observer", None)
        if observer is not None:
            observer.shift_channels(after.value_shift)
        if block.o in moments:
            moments[block.o].shift(after.value_shift)


def calibrate(model: nn.Module, layout: ModelLayout, config: LRPQConfig, batches: list[torch.Tensor],
              show_progress: bool = True, timings: dict[str, float] | None = None,
              fold_attention_into: Collection[str] | None = None) -> None:
    """One observation pass, reparameterization, then weights and activation grids are fixed.

    `timings`, if given, receives the seconds spent in each stage. `fold_attention_into` (the converted layers that
    may change): measure the attention ranges during the observation pass, fold the attention changes of `config`
    into those layers after it (`smoothing.fold_attention_changes`) and correct the observations accordingly, in
    place of a float pass of its own before calibration (needs `smoothing.ranges_measurable_in_calibration`).
    """
    timings = {} if timings is None else timings
    attach_observers(model, config, len(batches), mlp_hidden_quantizers(model, layout))
    reconstructed = (frozenset(name for block in layout.blocks for name in block.linears) if config.reconstruction
                     else frozenset())
    moments, handles = (attach_moment_hooks(model, layout, skip=reconstructed) if config.weight_rounding == "gptq"
                        else ({}, []))
    recorder = AttentionRangeRecorder(model, layout) if fold_attention_into is not None else None
    try:
        start = time.perf_counter()
        run_batches(model, batches, "Calibrating", show_progress)
        for handle in handles:
            handle.remove()
        timings["calibration_pass"] = time.perf_counter() - start
        start = time.perf_counter()
        if recorder is not None:
            recorder.remove()
            measured = recorder.ranges()
            changed = fold_attention_changes(model, layout, measured, config, fold_attention_into)
            correct_attention_observations(model, layout, measured, changed, moments)
        folds = set_layernorm_grids(model, layout, config)

        # Before the weights: a layer that folds its input steps into its weight columns needs them calibrated.
        finalize_activation_grids(model, num_images=sum(int(b.shape[0]) for b in batches),
                                  head_inputs=head_input_quantizers(model, layout))
        timings["grids_and_weights"] = time.perf_counter() - start
        if config.reconstruction == "block":  # learns and freezes the block weights; the rest is rounded below
            start = time.perf_counter()
            reconstruct_blocks(model, layout, config, batches, show_progress=show_progress)
            timings["reconstruction"] = time.perf_counter() - start
        start = time.perf_counter()

        def hessian_of(name: str) -> torch.Tensor | None:
            record = moments.get(name)
            if record is None or not record.count:
                return None
            factors = model.get_submodule(name).input_step_factors()
            if factors is not None:  # the layer multiplies x / steps (its unit-step codes)
                return record.second_moment(factors, torch.zeros_like(factors))
            return record.second_moment(*folds.get(name, (None, None)))

        freeze_weights(model, config.weight_range, hessian_of,
                       shared_input_of=lambda name: id(moments[name]) if name in moments else name)
        moments.clear()
        timings["grids_and_weights"] += time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
        if recorder is not None:
            recorder.remove()
        for module in model.modules():
            if isinstance(module, ActivationQuantizer):
                module.observer = None
