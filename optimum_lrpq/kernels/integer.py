"""What the integer backends (`onednn`, `intmm`) share: the int8 form of a stored weight, cache keys, and the parts
of the backend interface that do not depend on the GEMM used.

A stored weight row is `(qw - zw) * sw` with `bits`-bit codes `qw` and an integer zero point `zw`. Its int8 form is
`W = qw - t`, with per row the offset `t` closest to `zw` within [max(qw) - 127, min(qw) + 128] (the range that makes
`qw - t` fit int8): `t = zw` always for <= 7-bit weights, and `e = t - zw` is non-zero only for 8-bit rows that span
more than 256 - |zw - 128| codes; backends add `e` back through a rank-1 term.
"""

from __future__ import annotations

import abc
import collections
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..quantization import packing
from .backend import ActivationGrid, ConvGeometry, KernelBackend, PackedWeight, apply_activation
from .reference import ReferenceBackend

REFERENCE = ReferenceBackend()


def tensor_version(t: torch.Tensor | None) -> int | None:
    """`t._version` for cache keys: 0 for None, None for inference tensors (they have no version counter)."""
    if t is None:
        return 0
    if t.is_inference():  # asked first: reading `_version` raises for them, and raising costs ~7 us per call
        return None
    return t._version


@dataclass(frozen=True)
class Int8Rows:
    """The int8 form of a stored 2-d weight (see the module docstring)."""

    weight: torch.Tensor  # int8 [N, K], W = qw - t
    offset: torch.Tensor | None  # float64 [N], e = t - zw; None when every e is 0
    row_sum: torch.Tensor  # int64 [N], S = sum_c W[o, c]


# Bytes of int64 temporaries per block of rows in `int8_rows` (and the other widenings of a weight at load).
# Widening a whole matrix at once makes temporaries of up to 8x its int8 size (19 MB for a ViT-Base fc1); glibc
# answers the free of such a block by raising its mmap and trim thresholds (to 32 MB at most), after which its heap
# keeps more freed activations. Measured: a W4A4 ViT-Base adds 138 MiB instead of 144 after load + one forward at
# batch 1 (most of what the heap keeps after a forward remains: ~20 MiB that `malloc_trim` would return).
WIDENING_BLOCK_BYTES = 1 << 20


def row_blocks(rows: int, columns: int) -> list[tuple[int, int]]:
    """[start, end) blocks of `rows` whose int64 widening stays within `WIDENING_BLOCK_BYTES`."""
    step = max(1, WIDENING_BLOCK_BYTES // (8 * max(1, columns)))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def int8_rows(weight: PackedWeight) -> Int8Rows | None:
    """`weight` as int8 rows, or None when it has no exact integer form (a fractional weight zero point)."""
    out_features, in_features = weight.shape
    zero_point = weight.zero_point.detach().reshape(-1).double()
    if in_features == 0 or zero_point.numel() != out_features or not torch.equal(zero_point, zero_point.round()):
        return None
    w = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.codes.device)
    e = torch.empty(out_features, dtype=torch.float64, device=weight.codes.device)
    row_sum = torch.empty(out_features, dtype=torch.int64, device=weight.codes.device)
    zw = zero_point.to(torch.int32)
    for start, end in row_blocks(out_features, in_features):
        codes = packing.unpack(weight.codes[start:end], weight.bits, in_features).to(torch.int32)
        target = torch.minimum(torch.maximum(zw[start:end], codes.amax(dim=1) - 127), codes.amin(dim=1) + 128)
        codes -= target[:, None]
        w[start:end] = codes
        row_sum[start:end] = codes.sum(dim=1)
        e[start:end] = target - zw[start:end]
    return Int8Rows(w, e if bool((e != 0).any()) else None, row_sum)


def row_targets(zero_point: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """t per row (int32 [N]): the weight zero point plus the 8-bit offset e."""
    target = zero_point.detach().reshape(-1).to(torch.int32)
    if offset is not None:
        target = target + offset.round().to(torch.int32)
    return target


def packed_codes(w: torch.Tensor, zero_point: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The stored packed codes `qw = W + t` of int8 rows `w` (inverse of `int8_rows`)."""
    codes = w.to(torch.int32) + row_targets(zero_point, offset).to(w.device)[:, None]
    return packing.pack(codes.to(torch.uint8), bits)


class IntegerBackend(KernelBackend):
    """Base of the integer backends: their prepared weights (`prepared_type`) can stand in for the stored codes
    (`codes()`, `release()`), and convolutions use the reference math on the dequantized weight (`dense()`).

    `linear` is shared: layers whose weight has no integer form, and inputs the integer path cannot take (no grid,
    not float32, on another device, needing grad), are computed by the reference math; otherwise the backend's
    `constants` (grid- and bias-dependent, cached by the prepared weight; None: not representable) and
    `integer_linear` compute it. `path_counts` counts the calls of each path ("integer", "reference").
    """

    prepared_type: ClassVar[type]
    path_counts: ClassVar[collections.Counter]
    prepare_at_load = True
    quantizes_inputs = True  # the codes are computed from the input (and the reference fallback rounds it too)

    @abc.abstractmethod
    def constants(self, weight: Any, grid: ActivationGrid, bias: torch.Tensor | None) -> Any:
        """What the integer product of `weight` on `grid` with `bias` needs, or None where it cannot be exact."""

    @abc.abstractmethod
    def integer_linear(self, x: torch.Tensor, x2: torch.Tensor, weight: Any, constants: Any,
                       grid: ActivationGrid, activation: str | None = None) -> torch.Tensor:
        """The product of `x2` (`x` as [rows, in], float32) with the prepared weight, then `activation` (fused where
        the GEMM can apply it, else `apply_activation`): float32 [rows, out]."""

    # torch.compile cannot trace opaque prepacked weights: the compiled graph breaks here and this runs eagerly.
    @torch.compiler.disable
    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None,
               input_grid: ActivationGrid | None, activation: str | None = None) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):  # the reference layout (a weight with no integer form)
            self.path_counts["reference"] += 1
            return REFERENCE.linear(x, weight, bias, input_grid, activation)
        grad = torch.is_grad_enabled()
        constants = None
        if self.takes_input(x, weight, input_grid):
            constants = self.constants(weight, input_grid, bias)
        if constants is None:
            self.path_counts["reference"] += 1
            return REFERENCE.linear(x, weight.dense(x.dtype), bias, input_grid, activation)
        self.path_counts["integer"] += 1
        carries_gradient = grad and bias is not None and bias.requires_grad
        y = self.integer_linear(x, x.reshape(-1, weight.in_features), weight, constants, input_grid,
                                None if carries_gradient else activation)
        if carries_gradient:
            y = apply_activation(y + (bias - bias.detach()), activation)  # exactly +0, but carries the bias' gradient
        return y.reshape(*x.shape[:-1], weight.out_features)

    @staticmethod
    def takes_input(x: torch.Tensor, weight: Any, input_grid: ActivationGrid | None) -> bool:
        """Whether the integer path can take `x` for the prepared `weight`: a float32 input on the weight's device,
        of its width, on a grid, and not needing grad (the integer ops have no autograd)."""
        return (input_grid is not None and x.dtype == torch.float32 and x.device == weight.weight_scale.device
                and x.numel() > 0 and x.shape[-1] == weight.in_features
                and not (x.requires_grad and torch.is_grad_enabled()))

    def prepare_constants(self, prepared: Any, grid: ActivationGrid, bias: torch.Tensor | None) -> None:
        if isinstance(prepared, self.prepared_type):
            self.constants(prepared, grid, bias)

    def release_codes(self, prepared: Any) -> bool:
        """The int8 matrix gives the codes back exactly: a layer on the integer path then holds its weight once,
        as int8 (0.25x float32), instead of packed codes + int8."""
        if not isinstance(prepared, self.prepared_type):
            return False
        prepared.release()
        return True

    def restore_codes(self, prepared: Any) -> torch.Tensor:
        return prepared.codes()

    def conv2d(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None, input_grid: ActivationGrid | None,
               geometry: ConvGeometry) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor):
            weight = weight.dense(x.dtype)
        return REFERENCE.conv2d(x, weight, bias, input_grid, geometry)


# ---------------------------------------------------------------------------------------------- per-grid constants


def cache_key(*tensors: torch.Tensor | None) -> tuple:
    """(tensor, version) pairs: a cache keyed on the tensors themselves and on in-place edits of them."""
    return tuple((t, tensor_version(t)) for t in tensors)


def key_matches(key: tuple, cached: tuple | None) -> bool:
    """Whether a value cached under `cached` still holds for `key`: the same tensors, unchanged (an inference tensor
    has no version counter, so it never matches)."""
    return cached is not None and len(key) == len(cached) and all(
        new[0] is old[0] and new[1] is not None and new[1] == old[1] for new, old in zip(key, cached))


def integer_zero_point(zero_points: torch.Tensor) -> int:
    """The integer in [0, 255] nearest the mean of (possibly fractional) input zero points."""
    return min(max(round(float(zero_points.double().mean())), 0), 255)


@dataclass(frozen=True)
class StepBlocks:
    """Input channels grouped by the step their codes take in the product (`ActivationGrid.product_step`): an
    integer GEMM factors one step out of each block. Per block: its channels (ascending indices; None: one block of
    every channel, in place), its step and the integer zero point given to the GEMM; `remainder[c]` is channel c's
    zero point minus its block's, corrected through the bias (`folded_bias`)."""

    channels: list[torch.Tensor | None]
    steps: list[float]
    zero_points: list[int]
    remainder: torch.Tensor  # float64 [K]


def step_blocks(step: torch.Tensor, zero_point: torch.Tensor, max_blocks: int,
                single: bool = False) -> StepBlocks | None:
    """Blocks of channels sharing a step (`step`, `zero_point`: [K]); None with more than `max_blocks` steps.
    `single`: one block with the smallest step, for weights that carry the other steps' multiples themselves."""
    values, block_of = torch.unique(step, return_inverse=True)
    if single or values.numel() == 1:
        zi = integer_zero_point(zero_point)
        return StepBlocks([None], [float(values[0])], [zi], zero_point.double() - zi)
    if values.numel() > max_blocks:
        return None
    remainder = torch.empty(step.numel(), dtype=torch.float64, device=step.device)
    channels, zero_points = [], []
    for g in range(values.numel()):
        members = torch.nonzero(block_of == g).flatten()
        zi = integer_zero_point(zero_point[members])
        remainder[members] = zero_point[members].double() - zi
        channels.append(members)
        zero_points.append(zi)
    return StepBlocks(channels, [float(v) for v in values], zero_points, remainder)


def folded_bias(bias: torch.Tensor | None, weight_scale: torch.Tensor, w: torch.Tensor, step: torch.Tensor,
                remainder: torch.Tensor) -> torch.Tensor:
    """b - sw * (W @ (step * remainder)) in float64 [N]: the zero-point remainders of `step_blocks`, exactly."""
    sw = weight_scale.double()
    b = bias.detach().double() if bias is not None else torch.zeros_like(sw)
    v = step.double() * remainder
    product = torch.empty_like(sw)
    for start, end in row_blocks(w.shape[0], w.shape[1]):  # W widened a block at a time (`WIDENING_BLOCK_BYTES`)
        product[start:end] = w[start:end].double() @ v
    return b - sw * product
