"""The `torch._int_mm` backend: exact int8 x int8 -> int32 linear layers on CUDA GPUs (and x86 CPUs with VNNI/AMX).

`torch._int_mm` multiplies signed int8 matrices; the input codes are unsigned (0 .. 2**bits - 1), so they are
shifted by 128 into int8 (`a = q - 128`, exact) and the shift is given back through the weight column sums. With the
weight rows `(qw[o] - zw[o]) * sw[o]` written as an int8 matrix `W = qw - t` (`t = zw`, or an offset `e = t - zw`
for 8-bit rows spanning the whole code range, as in the oneDNN backend) and the input's product steps `p_c` grouped
into blocks g of channels sharing one (`ActivationGrid.product_step`, else the grid's steps; zero points `z_c`,
`zi_g` the integer nearest their mean in the block, `r_c = z_c - zi_g`):

    y[n, o] = sw[o] * sum_g p_g * ( a_g @ W_gᵀ + (128 - zi_g) * S_g[o] )      <- torch._int_mm per block, int32
              + b[o] - sw[o] * sum_c W[o, c] p_c r_c                          <- folded into the bias, per grid
              [+ sw[o] e[o] * sum_c p_c (q[n, c] - z_c)]                      <- rank-1, only 8-bit offset rows

The integer part is exact; only the epilogue rounds (outputs equal the reference backend's to float rounding). The
input codes are the reference formula's, `clamp(round(x / scale + zero_point), 0, qmax)`. CUDA's `_int_mm` wants
more than 16 rows and inner / outer sizes that are multiples of 8: rows are padded, each block's channels are padded
with zero columns (a zero code times a zero weight adds nothing), and a layer whose output size is not a multiple
of 8 runs on the reference math. Not measured on a GPU yet (this project's machines had none when it was written);
the tests run it on the CPU, where `_int_mm` has no size constraints.

Availability: CUDA devices with compute capability >= 7.5 (int8 tensor cores) and x86 CPUs with a non-saturating
int8 dot product (where "auto" prefers the oneDNN backend). Where the integer path does not apply (no input grid,
non-float32 inputs, inputs needing grad, more than `MAX_BLOCKS` product steps, convolutions) the layer is computed by
the reference math, with a float copy of the weight made on first need.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import ActivationGrid, PackedWeight, apply_activation, register_backend
from .integer import IntegerBackend, cache_key, folded_bias, int8_rows, key_matches, packed_codes, step_blocks
from .onednn import cpu_has_int8_dot
from .reference import dequantize_weight

# A per-channel grid with more distinct product steps than this runs on the reference math (one GEMM per block).
MAX_BLOCKS = 8
# How many `linear` calls took each path ("integer" or "reference"); for tests and profiling.
PATH_COUNTS: collections.Counter = collections.Counter()

_CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: more than 16 rows
_CUDA_MULTIPLE = 8  # ... and inner / outer sizes that are multiples of 8


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(eq=False)
class _Blocks:
    """The grid- and bias-dependent part: channel blocks sharing a product step, and the folded constants."""

    channels: list[torch.Tensor | None]  # int64 channel indices per block (None: all channels, in place)
    weights: list[torch.Tensor]  # int8 [K_g padded, N]: Wᵀ rows of the block's channels
    steps: list[float]  # p_g
    shifts: list[torch.Tensor]  # float32 [N]: (128 - zi_g) * S_g
    bias: torch.Tensor  # float32 [N]
    coef: torch.Tensor | None  # float32 [N] (sw * e), None when every e is 0
    product_step: torch.Tensor | None  # float32 [K] (rank-1 term only)
    zero_point: torch.Tensor | None  # float32 [K] (rank-1 term only)


@dataclass(eq=False)
class IntMMWeight:
    """A linear weight prepared for `torch._int_mm`: Wᵀ as int8 [K, N] (see the module docstring)."""

    transposed: torch.Tensor | None  # int8 [K, N] (None while the blocks of a grouped grid hold the columns)
    in_features: int
    out_features: int
    weight_scale: torch.Tensor  # float32 [N]
    offset: torch.Tensor | None  # float64 [N] e = t - zw; None when all zero
    source: PackedWeight  # the stored weight (its codes None after `release()`)
    _dense: dict = field(default_factory=dict, repr=False)
    _key: tuple | None = field(default=None, repr=False)
    _blocks: _Blocks | None = field(default=None, repr=False)

    def int8_weight(self) -> torch.Tensor:
        """W = qw - t, int8 [N, K]."""
        if self.transposed is not None:
            return self.transposed.t()
        w = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=self.weight_scale.device)
        for channels, block in zip(self._blocks.channels, self._blocks.weights, strict=True):
            if channels is None:
                return block[: self.in_features].t()
            w[:, channels] = block[: channels.numel()].t()
        return w

    def codes(self) -> torch.Tensor:
        """The packed codes, as stored (rebuilt from W after `release()`)."""
        if self.source.codes is not None:
            return self.source.codes
        return packed_codes(self.int8_weight(), self.source.zero_point, self.offset, self.source.bits)

    def release(self) -> None:
        self.source = dataclasses.replace(self.source, codes=None)

    def stored(self) -> PackedWeight:
        """The stored weight, its codes rebuilt from W after `release()`."""
        return self.source if self.source.codes is not None else dataclasses.replace(self.source, codes=self.codes())

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self._dense.get(dtype)
        if weight is None:
            weight = self._dense[dtype] = dequantize_weight(self.stored(), dtype)
        return weight

    def blocks(self, grid: ActivationGrid, bias: torch.Tensor | None) -> _Blocks | None:
        """The constants for (grid, bias), cached for the last pair seen (keyed on the tensors and their versions);
        None where the integer path does not apply."""
        key = cache_key(grid.scale, grid.zero_point, grid.product_step, bias)
        if key_matches(key, self._key):
            return self._blocks
        blocks = self._make_blocks(grid, bias)
        self._key, self._blocks = key, blocks
        return blocks

    def _make_blocks(self, grid: ActivationGrid, bias: torch.Tensor | None) -> _Blocks | None:
        scale = grid.scale.reshape(-1).float()
        zero_point = grid.zero_point.reshape(-1).float().expand(self.in_features)
        step = scale if grid.product_step is None else grid.product_step.reshape(-1).float()
        step = step.expand(self.in_features)
        if scale.numel() not in (1, self.in_features) or not (
                bool(torch.isfinite(scale).all()) and bool((scale > 0).all()) and bool(torch.isfinite(step).all())
                and bool((step > 0).all()) and bool(torch.isfinite(zero_point).all())):
            return None
        blocks = step_blocks(step, zero_point, MAX_BLOCKS)
        if blocks is None:
            return None
        w = self.int8_weight()
        cuda = w.device.type == "cuda"
        weights, shifts = [], []
        for channels, zi in zip(blocks.channels, blocks.zero_points, strict=True):
            block = w.t() if channels is None else w[:, channels].t()
            rows = block.shape[0]
            wt = torch.zeros(_round_up(rows, _CUDA_MULTIPLE) if cuda else rows, self.out_features, dtype=torch.int8,
                             device=w.device)
            wt[:rows] = block
            weights.append(wt)
            shifts.append(((128 - zi) * block.sum(dim=0, dtype=torch.int64).double()).float())
        folded = folded_bias(bias, self.weight_scale, w, step, blocks.remainder)
        coef = None if self.offset is None else (self.weight_scale.double() * self.offset).float()
        self.transposed = None  # the blocks hold W now (one grid per layer)
        return _Blocks(blocks.channels, weights, blocks.steps, shifts, folded.float(), coef,
                       step.float() if coef is not None else None,
                       zero_point.float() if coef is not None else None)

    def __reduce__(self):
        # Rebuilt from the stored codes (a copy shares nothing with this layout).
        return _prepare, (self.stored(),)


def _prepare(weight: PackedWeight) -> IntMMWeight | None:
    rows = int8_rows(weight)
    if rows is None:
        return None
    out_features, in_features = weight.shape
    return IntMMWeight(
        transposed=rows.weight.t().contiguous(),
        in_features=in_features,
        out_features=out_features,
        weight_scale=weight.scale.detach().reshape(-1).float().clone(),
        offset=rows.offset,
        source=weight,
    )


def _linear(x2: torch.Tensor, weight: IntMMWeight, blocks: _Blocks, grid: ActivationGrid) -> torch.Tensor:
    qmax = (1 << grid.bits) - 1
    codes = torch.clamp(torch.round(x2 / grid.scale.reshape(-1) + grid.zero_point.reshape(-1)), 0, qmax)
    shifted = (codes - 128).to(torch.int8)
    rows = shifted.shape[0]
    cuda = shifted.device.type == "cuda"
    if cuda and rows < _CUDA_MIN_ROWS:
        shifted = torch.cat([shifted, shifted.new_zeros(_CUDA_MIN_ROWS - rows, shifted.shape[1])])
    y = None
    for channels, wt, step, shift in zip(blocks.channels, blocks.weights, blocks.steps, blocks.shifts, strict=True):
        a = shifted if channels is None else shifted.index_select(1, channels)
        if a.shape[1] != wt.shape[0]:  # CUDA: the block's channels padded to a multiple of 8
            a = torch.cat([a, a.new_zeros(a.shape[0], wt.shape[0] - a.shape[1])], dim=1)
        part = torch._int_mm(a.contiguous(), wt)[:rows].float().add_(shift).mul_(step)
        y = part if y is None else y.add_(part)
    y.mul_(weight.weight_scale).add_(blocks.bias)
    if blocks.coef is not None:  # sum_c p_c (q_c - z_c), per row
        y.addr_((codes - blocks.zero_point) @ blocks.product_step, blocks.coef)
    return y


class IntMMBackend(IntegerBackend):
    name = "intmm"
    prepared_type = IntMMWeight
    path_counts = PATH_COUNTS
    priority = 5  # below oneDNN on CPUs that have both; the integer backend of CUDA devices
    requirements = "a CUDA GPU with compute capability >= 7.5, or a CPU with AVX512-VNNI, AVX-VNNI or AMX-INT8"

    def is_available(self, device: torch.device) -> bool:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            return False
        if not hasattr(torch, "_int_mm"):
            return False
        if device.type == "cuda":
            return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (7, 5)
        return device.type == "cpu" and cpu_has_int8_dot()

    def prepare_weight(self, weight: PackedWeight, dtype: torch.dtype) -> Any:
        """An `IntMMWeight` for float32 linear weights; the reference backend's dequantized weight otherwise."""
        if dtype == torch.float32 and len(weight.shape) == 2 and (
                weight.codes.device.type != "cuda" or weight.shape[0] % _CUDA_MULTIPLE == 0):
            prepared = _prepare(weight)
            if prepared is not None:
                return prepared
        return dequantize_weight(weight, dtype)

    def constants(self, weight: IntMMWeight, grid: ActivationGrid, bias: torch.Tensor | None) -> _Blocks | None:
        return weight.blocks(grid, bias)

    def integer_linear(self, x: torch.Tensor, x2: torch.Tensor, weight: IntMMWeight, blocks: _Blocks,
                       grid: ActivationGrid, activation: str | None = None) -> torch.Tensor:
        return apply_activation(_linear(x2, weight, blocks, grid), activation)


register_backend(IntMMBackend())
