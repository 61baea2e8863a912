"""Block reconstruction (BRECQ, Li et al. 2021, arXiv 2102.05426; QDrop, Wei et al. 2022, arXiv 2203.05740).

Per transformer block, in forward order, learn the rounding of each weight (AdaRound, `quantization.rounding`) and
the steps of the block's activation quantizers (LSQ: straight-through rounding, `quantization.uniform.quantize`) so
that the quantized block reproduces the float block's output on the calibration images. The quantized block is fed
the quantized model's own input to it, mixed element by element with the float input (QDrop's drop); the target is
the float model's output of that block. The result is what calibration makes anyway, codes and grids: the same
checkpoint format.

Runs after the activation grids are set and before the weights are frozen (`calibration.calibrate`). The float
model is the converted model itself with every activation quantizer passing its input through and each layer on its
float weight; the blocks before the current one are replayed, not stored, so memory holds one block's tensors on
the calibration images at a time (float input, quantized input, float output) plus a float copy of the weights of
the blocks already learned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import LRPQConfig
from ..models import ModelLayout
from ..nn import ActivationQuantizer, PackedWeightLayer, UniformQuantizer
from ..quantization import rounding, uniform
from .placement import model_device_and_dtype

logger = logging.get_logger(__name__)

# Adam learning rates: rounding logits (AdaRound's v lives on a scale of a few units; fewer steps than AdaRound's
# 20k need a larger rate than its 1e-3) and activation steps (relative: the step is learned as s * exp(u)).
ROUNDING_LR = 1e-2
STEP_LR = 1e-3
# Weight of the rounding regulariser against the reconstruction loss (mean squared error per output element,
# normalised by the float output's mean square, so the same weight fits every model and block).
ROUNDING_WEIGHT = 1e-4


class _StopForward(Exception):
    """Raised by a capture hook once the block of interest has run: the rest of the model is not needed."""


class _PassThrough:
    """An observer that records nothing: an activation quantizer with one attached returns its input unchanged."""

    per_channel = False

    def observe(self, x: torch.Tensor) -> None:
        pass


@dataclass
class _BlockCall:
    """How the model calls a block: its hidden states (concatenated over the calibration batches) and the other
    arguments (the same for every batch: Swin's `input_dimensions`, an absent mask)."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: torch.Tensor | None = None


def reconstruct_blocks(model: nn.Module, layout: ModelLayout, config: LRPQConfig, batches: list[torch.Tensor],
                       show_progress: bool = True) -> dict[str, tuple[float, float]]:
    """Learn the rounding and activation steps of every block (see the module doc), then freeze its weights.
    Returns each block's output error (mean squared error / the float output's mean square) before and after.

    The model must be converted and its activation grids set (`calibration.finalize_activation_grids`); its
    block weights are still float. Layers outside the blocks (patch embedding, heads, Swin's reductions) are left
    to `calibration.freeze_weights`.
    """
    if sum(int(b.shape[0]) for b in batches) < 2:
        raise ValueError("Block reconstruction needs at least 2 calibration images (it learns on random subsets of "
                         "them and mixes quantized and float inputs); pass more images, or set reconstruction=None.")
    errors: dict[str, tuple[float, float]] = {}
    float_weights: dict[PackedWeightLayer, torch.Tensor] = {}  # learned layers -> their float weight
    codes: dict[PackedWeightLayer, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # -> (codes, scale, zp)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(layout.blocks, desc="Reconstructing blocks", unit="block", disable=not show_progress)
    for block in bar:
        block_module = model.get_submodule(block.module)
        layers = {name: model.get_submodule(name) for name in block.linears}
        layers = {n: m for n, m in layers.items() if isinstance(m, PackedWeightLayer) and not m.is_frozen}
        if not layers:  # kept float (`modules_to_not_convert`): nothing to learn
            continue
        with _float_model(model, float_weights), torch.no_grad():
            reference = _capture(model, block_module, batches, with_output=True)
        with torch.no_grad():
            quantized = _capture(model, block_module, batches, with_output=False)
        before, after, learned = _learn_block(block.module, block_module, layers, reference, quantized, config,
                                              generator)
        errors[block.module] = (before, after)
        bar.set_postfix(error=f"{before:.3g}->{after:.3g}")
        del reference, quantized
        for layer, item in learned.items():
            # the quantized model runs on the learned weight from now on; the float one is kept for `_float_model`
            float_weights[layer] = layer.weight.data
            layer.weight.data = item.hard_weight().to(layer.weight.dtype)
            codes[layer] = (item.hard_codes().to(torch.uint8), item.scale, item.zero_point)
    for layer, stored in codes.items():  # frozen only now: until the last block, the float model is replayed
        layer.store_codes(*stored)
    logger.info("Block reconstruction, output error per block: "
                + ", ".join(f"{b:.3g}->{a:.3g}" for b, a in errors.values()))
    return errors


@contextmanager
def _float_model(model: nn.Module, float_weights: dict[PackedWeightLayer, torch.Tensor]) -> Iterator[None]:
    """The converted model computing the float model: every activation quantizer passes its input through and every
    learned layer is back on its float weight."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.observer is None]
    learned = {layer: layer.weight.data for layer in float_weights}
    try:
        for quant in quantizers:
            quant.observer = _PassThrough()
        for layer, weight in float_weights.items():
            layer.weight.data = weight
        yield
    finally:
        for quant in quantizers:
            quant.observer = None
        for layer, weight in learned.items():
            layer.weight.data = weight


def _capture(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], with_output: bool) -> _BlockCall:
    """Run the model on each batch up to `block` (and through it if `with_output`), recording its input (and
    output); the forward stops there."""
    device, dtype = model_device_and_dtype(model)
    hidden, outputs, call = [], [], {}

    def before(module, args, kwargs):
        hidden.append(args[0].detach())
        others = (*args[1:], *kwargs.values())
        if any(torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == args[0].shape[0] for a in others):
            raise NotImplementedError(
                f"Block reconstruction replays each block with its hidden states only; {type(module).__name__} also "
                "takes a per-image tensor argument. Set reconstruction=None for this model.")
        call.setdefault("args", args[1:])
        call.setdefault("kwargs", kwargs)
        if not with_output:
            raise _StopForward

    def after(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())
        raise _StopForward

    handles = [block.register_forward_pre_hook(before, with_kwargs=True)]
    if with_output:
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        for batch in batches:
            try:
                model(pixel_values=batch.to(device=device, dtype=dtype))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return _BlockCall(torch.cat(hidden), call["args"], call["kwargs"], torch.cat(outputs) if outputs else None)


@dataclass
class _LearnedLayer:
    """One weight layer being learned: w = (lower + h(v) - zero_point) * scale / factors, elementwise."""

    lower: torch.Tensor  # lower code of each weight ([out, row]; see `rounding.floor_and_logits`)
    logits: torch.Tensor  # AdaRound's v (learned)
    step: torch.Tensor  # scale / factors: the float value of one code step of each weight ([out, row])
    scale: torch.Tensor  # [out]
    zero_point: torch.Tensor  # [out]
    shape: tuple[int, ...]

    @classmethod
    def start(cls, layer: PackedWeightLayer, range_method: str) -> _LearnedLayer:
        rows, scale, zero_point = layer.weight_grid(range_method)
        lower, logits = rounding.floor_and_logits(rows, scale[:, None], zero_point[:, None],
                                                  uniform.qmax(layer.weight_bits))
        step = scale[:, None].expand_as(rows)
        factors = layer.input_step_factors()  # the rows carry them; the layer's float weight does not
        if factors is not None:
            step = step / factors.to(rows.device)
        return cls(lower, logits.requires_grad_(True), step.contiguous(), scale, zero_point, tuple(layer.weight.shape))

    def _weight(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes - self.zero_point[:, None]) * self.step).reshape(self.shape)

    def weight(self) -> torch.Tensor:
        """The float weight of the soft codes, as the layer's forward takes it (differentiable in the logits)."""
        return self._weight(rounding.soft_codes(self.lower, self.logits))

    def hard_codes(self) -> torch.Tensor:
        """The codes rounded as learned; at the start logits, round to nearest."""
        return rounding.hard_codes(self.lower, self.logits.detach())

    def hard_weight(self) -> torch.Tensor:
        return self._weight(self.hard_codes())


def _learnable_quantizers(block: nn.Module, layers: dict[str, PackedWeightLayer]) -> dict[str, UniformQuantizer]:
    """The block's uniform activation quantizers whose steps are learned: all but the per-channel inputs whose steps
    the consumer's weight columns carry (`input_step_levels`), which must stay as the weights were rounded for."""
    tied = {id(layer.input_quant) for layer in layers.values()
            if getattr(layer, "input_quant", None) is not None and layer.input_step_levels is not None}
    return {name: m for name, m in block.named_modules()
            if isinstance(m, UniformQuantizer) and id(m) not in tied and m.observer is None}


def _learn_block(name: str, block: nn.Module, layers: dict[str, PackedWeightLayer], reference: _BlockCall,
                 quantized: _BlockCall, config: LRPQConfig, generator: torch.Generator
                 ) -> tuple[float, float, dict[PackedWeightLayer, _LearnedLayer]]:
    """Learn one block: sets the learned steps in its quantizers and returns the block's output error before and
    after (hard rounding, on the quantized inputs of all calibration images) and each layer's learned rounding."""
    prefix = {layer: f"{n[len(name) + 1:]}" for n, layer in layers.items()}
    target = reference.output
    target_power = float(target.pow(2).mean())
    steps = config.reconstruction_steps
    if not math.isfinite(target_power) or float(target.var()) == 0.0:
        logger.warning(f"{name}: the float block's output is constant on the calibration images, so there is nothing "
                       "to reconstruct; its weights are rounded to nearest and its steps kept.")
        steps, target_power = 0, 1.0
    learned = {layer: _LearnedLayer.start(layer, config.weight_range) for layer in layers.values()}
    quantizers = _learnable_quantizers(block, layers) if steps else {}
    log_steps = {q: torch.zeros_like(q.scale, requires_grad=True) for q in quantizers.values()}
    initial_steps = {q: q.scale.detach().clone() for q in quantizers.values()}

    def forward(hidden: torch.Tensor, hard: bool) -> torch.Tensor:
        overrides = {f"{prefix[layer]}.weight": item.hard_weight() if hard else item.weight()
                     for layer, item in learned.items()}
        overrides.update({f"{qname}.scale": initial_steps[q] * log_steps[q].exp() for qname, q in quantizers.items()})
        out = functional_call(block, overrides, (hidden, *quantized.args), dict(quantized.kwargs))
        return out[0] if isinstance(out, tuple) else out

    images = quantized.hidden.shape[0]
    batch = min(config.reconstruction_batch_size, images)

    def error() -> float:
        """Output error of the hard-rounded block on all calibration images (quantized inputs)."""
        with torch.no_grad():
            total = sum(float((forward(quantized.hidden[i:i + batch], True) - target[i:i + batch]).pow(2).sum())
                        for i in range(0, images, batch))
        return total / target.numel() / target_power

    # The start logits reproduce the float weight, and their hard codes are round-to-nearest (h(v) >= 1/2 exactly
    # where v >= 0): the error to beat.
    start_logits = {layer: item.logits.detach().clone() for layer, item in learned.items()}
    before = error()
    optimizer = torch.optim.Adam([{"params": [i.logits for i in learned.values()], "lr": ROUNDING_LR},
                                  {"params": list(log_steps.values()), "lr": STEP_LR}])
    for step in range(steps):
        index = torch.randperm(images, generator=generator)[:batch]
        hidden = quantized.hidden[index]
        if config.reconstruction_drop > 0:  # QDrop: keep the float input on a random part of the elements
            keep_float = torch.rand(hidden.shape, generator=generator) < config.reconstruction_drop
            hidden = torch.where(keep_float, reference.hidden[index], hidden)
        loss = (forward(hidden, hard=False) - target[index]).pow(2).mean() / target_power
        beta = rounding.annealed_beta(step / steps)
        if beta is not None:
            loss = loss + ROUNDING_WEIGHT * sum(rounding.rounding_regularizer(i.logits, beta)
                                                for i in learned.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = error() if steps else before
    if not steps or after > before:  # never worse than rounding to nearest on the calibration images
        if steps:
            logger.info(f"{name}: reconstruction did not lower the output error ({before:.3g} -> {after:.3g}); "
                        "kept nearest rounding and the calibrated steps.")
        for layer, item in learned.items():
            item.logits.data = start_logits[layer]
        for q in quantizers.values():
            log_steps[q].data.zero_()
        after = before
    with torch.no_grad():
        for q in quantizers.values():
            q.scale.copy_((initial_steps[q] * log_steps[q].exp()).clamp_min(uniform.MIN_SCALE))
    return before, after, learned
