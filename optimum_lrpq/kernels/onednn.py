"""The oneDNN backend: exact integer linear layers on x86 CPUs with VNNI or AMX (u8 x s8 -> s32 GEMM).

For a per-tensor input grid (`sx`, `zx`, possibly fractional `zx`) and weight rows `(qw[o] - zw[o]) * sw[o]`:

    y[n, o] = sx * sw[o] * sum_c (qx[n, c] - zx) * (qw[o, c] - zw[o]) + b[o]

The weight side is precomputed once (`prepare_weight`): per row an integer offset `t[o]` (`zw[o]` itself whenever
`qw - zw` fits int8, always for <= 7-bit weights; `128` for 8-bit rows spanning the whole code range) gives the int8
matrix `W = qw - t`, prepacked for oneDNN, its row sums `S[o]` and the rest `e[o] = t[o] - zw[o]`. With `zi` the
integer nearest `zx` and `f = zx - zi`, the product is

    y = sx*sw * sum_c (qx - zi) * W                    <- onednn::qlinear_pointwise (u8 input, zero point zi)
        + b - sx*sw*f*(S + e*K)                        <- folded into the GEMM's float bias (cached per grid)
        + (sx*sw*e) (x) (sum_c qx - K*zi)              <- rank-1 term, only when some e[o] != 0 (8-bit weights)

The integer part is exact (s32 accumulation; VNNI/AMX do not saturate, unlike the int16 path of older ISAs, which
is why `is_available` asks for them) and only the float epilogue rounds: outputs match a float64 evaluation of the
formula to ~1e-7 relative. The input codes are computed with the reference formula (`x / scale + zero_point`,
rounded, clamped), so they are bit-identical to what the reference backend fake-quantizes with.

A per-channel input grid runs as one GEMM per distinct *product step* (the grid's `product_step`, else its steps),
up to `MAX_STEP_GROUPS`: channels sharing one are a block of columns with one `sx`; per-channel zero points are
corrected through the bias like the fractional part above. With `LRPQConfig.input_step_levels` (the default) the
product steps are a few powers of two while the codes keep each channel's own step.

Where the integer path does not apply, the layer is computed exactly like the reference backend does (a float copy
of the weight is dequantized on first need and kept with the prepared weight): per-channel grids with more than
`MAX_STEP_GROUPS` product steps, no input grid, inputs that are not float32 CPU tensors, and inputs that require
grad while grad mode is on (the oneDNN op has no autograd). A bias that requires grad keeps its gradient on the
integer path. Convolutions (the patch embedding, < 1 % of a ViT's MACs) always use the reference math.

Layers that read the same input (q, k and v: `nn.fusion.SharedInputGroup`) are one GEMM on their int8 rows stacked
into one prepacked matrix (`prepare_group`, `StackedWeight`), which then holds their weights (each layer's own
matrix is dropped): at batch 1 a oneDNN call costs tens of microseconds whatever its size, and DINOv2-S's q, k and v
are 65 x 384 x 384 each (DINOv2-S W4A4 at batch 1 on a 2-core EPYC, with the other changes of the same commit:
0.72-0.75x -> 0.66-0.71x float32's latency, min and median of 60 interleaved rounds, two processes each).

Outputs of at least 32 MB (ViT-Base's fc1 and stacked q/k/v outputs at batch 32) are written into memory kept from
one forward to the next (`memory.OutputBuffers`; the bias copied in, then oneDNN's "sum" post-op adds the product:
the same values), never into a buffer some tensor still shares: fresh memory of that size is new pages from the
kernel, and faulting them in took longer than the GEMM itself (fc1 at batch 32 on a 2-core AMX Xeon, 2 threads: 33 ms
into fresh memory, 15 ms into a kept buffer, the bias copy included). oneDNN takes no GELU after a "sum", so such an
fc1 applies GELU in place right after.
`release_output_buffers()` gives the kept memory back; `OPTIMUM_LRPQ_REUSE_OUTPUTS=0` turns the reuse off.

The quantization of the input (one elementwise pass over x) costs about as much as the GEMM itself in eager
PyTorch; setting `OPTIMUM_LRPQ_ONEDNN_COMPILE=1` (or `COMPILE_QUANTIZE = True` here) runs it through a
`torch.compile`d kernel instead (bit-identical codes, one graph for all shapes and bit widths; ~3-4 s of
compilation at the first call of each process). Measured on a 2-core AVX512-VNNI EPYC, 2 threads: the quantization
of a 6304 x 768 input takes 8 ms instead of 32, and the four ViT-Base linears at batch 32 take 0.28x the fp32
F.linear time instead of 0.41x (0.62x / 0.91x of bf16); at batch 1, 0.27x instead of 0.31x
(benchmarks/kernel_micro.py). The oneDNN call itself stays eager: its prepacked weight is an opaque MKLDNN tensor
that torch.compile cannot take. That tensor lives only in the prepared weight (never a module buffer: it cannot be
saved or copied); deepcopy/pickle of a prepared weight rebuild it from the stored codes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import ActivationGrid, PackedWeight, apply_activation, register_backend
from .integer import (
    IntegerBackend,
    cache_key,
    folded_bias,
    int8_rows,
    integer_zero_point,
    key_matches,
    packed_codes,
    row_blocks,
    step_blocks,
    tensor_version,
)
from .memory import OUTPUT_BUFFERS
from .reference import dequantize_weight

# Quantize the input with a torch.compile'd kernel (read at every call; see the module docstring).
COMPILE_QUANTIZE = os.environ.get("OPTIMUM_LRPQ_ONEDNN_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")

# How many `linear` calls took each path ("integer" or "reference"); for tests and profiling.
PATH_COUNTS: collections.Counter = collections.Counter()

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _ops_exist() -> bool:
    try:
        return (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack")
                and hasattr(torch.ops.onednn, "qlinear_pointwise")
                and hasattr(torch.ops.onednn.qlinear_pointwise, "binary") and torch.backends.mkldnn.is_available())
    except Exception:  # noqa: BLE001  (any failure to look the ops up means: not available)
        return False


def cpu_has_int8_dot() -> bool:
    """Whether the CPU has a non-saturating u8 x s8 dot product (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    isa_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    if isa_cap and isa_cap not in ("all", "default") and "vnni" not in isa_cap and "amx" not in isa_cap:
        return False  # oneDNN was told not to use the VNNI/AMX instructions
    try:
        capabilities = torch._C._cpu._get_cpu_capability()  # torch >= 2.4: a dict of CPUID flags
    except Exception:  # noqa: BLE001
        capabilities = None
    if isinstance(capabilities, dict):
        return any(bool(capabilities.get(flag, False)) for flag in _VNNI_FLAGS)
    try:  # the private helpers built on it
        return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001
        return False


_SUPPORTED: bool | None = None


def supported() -> bool:
    """The ops exist in this torch build and this CPU multiplies int8 exactly with them (cached)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = _ops_exist() and cpu_has_int8_dot()
    return _SUPPORTED


# ---------------------------------------------------------------------------------------------- input codes


# Float32 elements per block of `_code_blocks`: a block small enough to stay in cache
# between its passes, and no float temporary the size of the input (fc2's input is 77 MB at batch 32 on ViT-Base).
QUANTIZE_BLOCK_ELEMENTS = 1 << 19


def _quantize_eager(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    rows, columns = x.shape
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=x.device)
    if rows <= _block_rows(columns):
        return store_codes(codes, torch.addcdiv(zero_point, x, scale).round_().clamp_(0, qmax), qmax)
    for start, end, block in _code_blocks(x, scale, zero_point, qmax):
        store_codes(codes[start:end], block, qmax)
    return codes


def store_codes(codes: torch.Tensor, values: torch.Tensor, qmax: int) -> torch.Tensor:
    """Write float `values` (integers in [0, qmax]) into the uint8 tensor `codes`; returns `codes`.

    PyTorch's CPU copy from float32 to uint8 is not vectorized (on a 2-core AVX512 EPYC: 138 us for 170 x 3072
    values, against 19 us to int8): codes up to 127 go through the int8 view of the same bytes, 8-bit codes through
    int32 (44 us). The same bytes either way."""
    if qmax <= 127:
        codes.view(torch.int8).copy_(values)
    else:
        codes.copy_(values.to(torch.int32))
    return codes


def _block_rows(columns: int) -> int:
    return max(1, QUANTIZE_BLOCK_ELEMENTS // max(1, columns))


def _code_blocks(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int):
    """(start, end, codes of rows start:end as float32), a block of rows at a time in one reused buffer."""
    rows, columns = x.shape
    buffer = torch.empty(max(1, min(rows, _block_rows(columns))), columns, dtype=torch.float32, device=x.device)
    for start in range(0, rows, buffer.shape[0]):
        end = min(rows, start + buffer.shape[0])
        t = buffer[: end - start]
        # zero_point + x / scale, with one rounding per operation like the reference's `x / scale + zero_point`
        torch.addcdiv(zero_point, x[start:end], scale, out=t)
        yield start, end, t.round_().clamp_(0, qmax)


def _quantize_math(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale + zero_point), 0, qmax).to(torch.uint8)


_compiled_quantize = None
_compile_failed = False


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """uint8 codes `clamp(round(x / scale + zero_point), 0, qmax)` of a 2-d float32 `x` (per-tensor grid)."""
    global _compiled_quantize, _compile_failed
    if COMPILE_QUANTIZE and not _compile_failed:
        try:
            if _compiled_quantize is None:
                _compiled_quantize = torch.compile(_quantize_math, dynamic=True)
            return _compiled_quantize(x, scale, zero_point, qmax)
        except Exception as error:  # noqa: BLE001  (no compiler toolchain, unsupported platform...)
            _compile_failed = True
            warnings.warn(f"oneDNN backend: compiling the input quantization failed ({error!r}); using eager ops.",
                          RuntimeWarning, stacklevel=2)
    return _quantize_eager(x, scale, zero_point, qmax)


class _LastCodes:
    """The codes of the last input quantized on a producer's grid (`shared=True`), for its next consumers.

    q, k and v (and Swin's / DINOv2's equivalents) read the same LayerNorm output: quantizing it once instead of
    three times saves two elementwise passes per block. A hit needs the very same tensor object (held weakly, so a
    freed input can never match a new one), the same storage, shape and version counter (where the tensor has one:
    inference tensors do not, and cannot be modified in place outside inference mode), and the same grid tensors."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._codes: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None

    @staticmethod
    def _key_of(x: torch.Tensor, grid: ActivationGrid, qmax: int) -> tuple:
        return (x.data_ptr(), tuple(x.shape), tensor_version(x), id(grid.scale), tensor_version(grid.scale),
                id(grid.zero_point), tensor_version(grid.zero_point), qmax)

    def get(self, x: torch.Tensor, grid: ActivationGrid, qmax: int) -> torch.Tensor | None:
        if self._key is None or self._ref() is not x or self._key != self._key_of(x, grid, qmax):
            return None
        return self._codes

    def put(self, x: torch.Tensor, grid: ActivationGrid, qmax: int, codes: torch.Tensor) -> None:
        self._ref, self._key, self._codes, self._sums = weakref.ref(x), self._key_of(x, grid, qmax), codes, None

    def row_sums(self, codes: torch.Tensor) -> torch.Tensor:
        """`_CODE_SUMS(codes)` (not to be modified in place), computed once for the shared codes: q, k and v with
        8-bit weights each need the same sums."""
        if codes is not self._codes:
            return _CODE_SUMS(codes)
        if self._sums is None:
            self._sums = _CODE_SUMS(codes)
        return self._sums


_SHARED_CODES = _LastCodes()


class _CodeSums:
    """Per-row sums of uint8 codes, computed by oneDNN as a GEMM with one row of ones.

    The rank-1 term of 8-bit weight rows needs sum_c q[n, c] for every row of the input. `codes.sum(dim=1,
    dtype=torch.int32)` widens the whole [rows, K] matrix first (on a 2-core AVX512-VNNI EPYC: 23 ms for
    6304 x 3072 codes); the same sums as a u8 x s8 GEMM against ones read the codes once (1.4 ms), exact (int32
    accumulation; float32 holds every integer up to 2**24, i.e. sums of up to `MAX_COLUMNS` codes of 255 exactly;
    wider inputs take the widening sum). Below `MIN_ELEMENTS` codes the widening sum is the faster one (a oneDNN
    call costs ~30 us whatever its size: 7 us instead of 30 for 65 x 384 codes, even at 1000 x 768). One prepacked
    row per K, kept for the process (K bytes each)."""

    MAX_COLUMNS = (1 << 24) // 255
    MIN_ELEMENTS = 1 << 20

    def __init__(self) -> None:
        self._packs: dict[int, torch.Tensor] = {}
        self._unit = torch.ones(1)
        self._zero = torch.zeros(1, dtype=torch.int64)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 [rows]: sum_c codes[:, c] (2-d uint8 `codes`, exact)."""
        columns = codes.shape[1]
        if columns > self.MAX_COLUMNS or codes.numel() < self.MIN_ELEMENTS:
            return codes.sum(dim=1, dtype=torch.int64).float()
        pack = self._packs.get(columns)
        if pack is None:
            pack = self._packs[columns] = torch.ops.onednn.qlinear_prepack(
                torch.ones(1, columns, dtype=torch.int8), None)
        sums = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, pack, self._unit, self._zero, None, 1.0, 0,
                                                  torch.float32, "none", [], "")
        return sums.reshape(-1)


_CODE_SUMS = _CodeSums()


# ---------------------------------------------------------------------------------------------- prepared weight


@dataclass(eq=False)
class _Terms:
    """What one (input grid, bias) pair contributes: the oneDNN call's arguments and the rank-1 coefficient."""

    scale: float
    zero_point: int  # the integer part given to oneDNN
    bias: torch.Tensor  # float32 [N]
    coef: torch.Tensor | None  # float32 [N] (sx*sw*e), None when every e is 0
    # float32 [K]: the grid's one step and zero point repeated per input channel, for the input codes. Repeated
    # because an elementwise op broadcasting a 1-element tensor along rows is not vectorized: on a 2-core AVX512
    # EPYC, addcdiv of a 6304 x 768 input takes 1.77 ms with [1] operands and 0.78 ms with contiguous [768] ones.
    code_scale: torch.Tensor
    code_zero_point: torch.Tensor


@dataclass(eq=False)
class _GroupedTerms:
    """A per-channel input grid whose steps take a few distinct values: one oneDNN GEMM per group of channels.

    Channels are reordered so each group is a contiguous block of `order`; `packs[g]` holds the int8 weight
    columns of group g, `scales[g]` its step and `zero_points[g]` the integer given to oneDNN; the per-channel zero
    points' remainders are folded into `bias`."""

    order: torch.Tensor | None  # int64 [K]: channel indices, grouped (None: one group, channels in place)
    bounds: list[tuple[int, int]]  # [start, end) of each group in `order`
    packs: list[torch.Tensor]  # opaque MKLDNN int8 tensors [N, K_g]
    scales: list[float]
    zero_points: list[int]
    scale: torch.Tensor  # float32 [K], the per-channel grid as given (for the input codes)
    zero_point: torch.Tensor  # float32 [K]
    bias: torch.Tensor  # float32 [N]
    coef: torch.Tensor | None  # float32 [N] (sw*e), None when every e is 0
    shift: float  # sum_c s_c zi_c (rank-1 term only)
    # int [K] when the one pack holds W * multiplier (product steps folded into the int8 columns), else None
    multiplier: torch.Tensor | None = None


# A per-channel grid with more distinct steps than this runs on the reference math (one GEMM per group).
MAX_STEP_GROUPS = 8


@dataclass(eq=False)
class OneDNNWeight:
    """A linear weight prepared for `onednn::qlinear_pointwise` (see the module docstring for the formula)."""

    packed: torch.Tensor | None  # opaque MKLDNN int8 tensor [N, K] (None while per-group packs serve the layer)
    in_features: int
    out_features: int
    weight_scale: torch.Tensor  # float32 [N]
    weight_zero_points: torch.Tensor  # int64 zeros [N]: W is symmetric by construction
    row_sum: torch.Tensor  # float64 [N], S = sum_c W[o, c]
    offset: torch.Tensor | None  # float64 [N], e = t - zw; None when all zero
    # The stored weight (references, not a copy): for the reference fallback and rebuilds. After `release()` its
    # codes are None: the prepacked matrix is then the only copy of the weight, and `codes()` rebuilds them.
    source: PackedWeight
    # (stacked layout, first row, end row) once `OneDNNBackend.prepare_group` moved these rows into one matrix with
    # its siblings' (q, k, v): `packed` is then None and the rows are read from there
    stack: tuple[StackedWeight, int, int] | None = field(default=None, repr=False)
    _dense: dict = field(default_factory=dict, repr=False)  # dtype -> dequantized weight (fallback only)
    _terms_key: tuple | None = field(default=None, repr=False)
    _terms: _Terms | None = field(default=None, repr=False)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference backend's weight (dequantized on first use, then kept)."""
        weight = self._dense.get(dtype)
        if weight is None:
            weight = self._dense[dtype] = dequantize_weight(self.stored(), dtype)
        return weight

    def release(self) -> None:
        """Drop the reference to the stored codes: the prepacked matrix (or per-group matrices) stands for them."""
        if self.packed is None and self.stack is None and not isinstance(self._terms, _GroupedTerms):
            self.whole_pack()
        self.source = dataclasses.replace(self.source, codes=None)

    def stored(self) -> PackedWeight:
        """The stored weight, its codes rebuilt from the prepacked matrix after `release()`."""
        if self.source.codes is not None:
            return self.source
        return dataclasses.replace(self.source, codes=self.codes())

    def codes(self) -> torch.Tensor:
        """The packed codes, as stored (`qw = W + t`, packed)."""
        if self.source.codes is not None:
            return self.source.codes
        return packed_codes(self.int8_weight(), self.source.zero_point, self.offset, self.source.bits)

    def terms(self, grid: ActivationGrid, bias: torch.Tensor | None) -> _Terms | _GroupedTerms | None:
        """The grid- and bias-dependent constants (None: a per-channel grid with more than `MAX_STEP_GROUPS`
        distinct steps, or a degenerate one).

        Cached for the last (grid, bias) seen: the key holds the tensors themselves (identity) and their versions,
        so replacing or editing the grid or the bias in place recomputes them."""
        key = cache_key(grid.scale, grid.zero_point, grid.product_step, bias)
        if key_matches(key, self._terms_key):
            return self._terms
        if self.source.codes is None and self.packed is None and self.stack is None:
            # released, per-group packs: the next terms may not keep them, so rejoin them
            self.packed = torch.ops.onednn.qlinear_prepack(self.int8_weight(), None)
        terms = self._compute_terms(grid, bias)
        self._terms_key, self._terms = key, terms
        return terms

    def _compute_terms(self, grid: ActivationGrid, bias: torch.Tensor | None) -> _Terms | _GroupedTerms | None:
        scale, zero_point = grid.scale.reshape(-1), grid.zero_point.reshape(-1)
        if not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
                and bool(torch.isfinite(zero_point).all())):
            return None  # a degenerate grid: leave it to the reference math
        if grid.product_step is not None and (grid.product_step.numel() not in (1, scale.numel()) or not bool(
                (grid.product_step > 0).all() and torch.isfinite(grid.product_step).all())):
            return None
        sw = self.weight_scale.double()
        b = bias.detach().double() if bias is not None else torch.zeros_like(sw)
        # Where the weight columns carry part of the steps, the codes take the rest (`product_step`) in the product.
        step = scale if grid.product_step is None else grid.product_step.reshape(-1).expand_as(scale)
        if bool((scale == scale[0]).all()) and bool((zero_point == zero_point[0]).all()):
            sx, zx = float(step[0]), float(zero_point[0])
            zi = integer_zero_point(zero_point[:1])
            f = zx - zi
            extra = self.row_sum if self.offset is None else self.row_sum + self.offset * self.in_features
            folded = (b - sx * sw * f * extra).float()
            coef = None if self.offset is None else (sx * sw * self.offset).float()
            code_scale = scale[:1].float().expand(self.in_features).contiguous()
            code_zero_point = zero_point[:1].float().expand(self.in_features).contiguous()
            return _Terms(sx, zi, folded.contiguous(), coef, code_scale, code_zero_point)
        if scale.numel() != self.in_features or zero_point.numel() not in (1, self.in_features):
            return None
        return self._grouped_terms(scale, step.expand(self.in_features), zero_point.expand(self.in_features), b, sw)

    def _grouped_terms(self, scale: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, b: torch.Tensor,
                       sw: torch.Tensor) -> _GroupedTerms | None:
        """y = sum_g s_g*sw * (q_g - zi_g) @ W_gᵀ  +  b - sw * W @ (s * (z - zi))  [+ sw*e * sum_c s_c (q_c - z_c)],
        with codes q on the grid (`scale`, `zero_point`) and `step` s the factor each channel's codes take in the
        product (the grid's own steps, or the power-of-two levels of `input_step_levels`)."""
        w = self.int8_weight()
        multiplier = self._step_multiplier(step, w)
        blocks = step_blocks(step, zero_point, MAX_STEP_GROUPS, single=multiplier is not None)
        if blocks is None:
            return None
        if blocks.channels[0] is None:  # one block: the whole matrix, channels in place
            order, bounds = None, [(0, self.in_features)]
            if multiplier is None:
                packs = [self.whole_pack()]
            else:  # the steps' multiples in the int8 columns: the multiplied pack replaces the whole-matrix one
                packs = [torch.ops.onednn.qlinear_prepack(w * multiplier.to(torch.int8), None)]  # fits (checked)
                self.packed = None
        else:
            order = torch.cat(blocks.channels)
            ends = torch.tensor([c.numel() for c in blocks.channels]).cumsum(0).tolist()
            bounds = list(zip([0, *ends[:-1]], ends, strict=True))
            packs = [torch.ops.onednn.qlinear_prepack(w[:, c].contiguous(), None) for c in blocks.channels]
            self.packed = None  # a layer keeps one grid: the per-group packs replace the whole-matrix one
        folded = folded_bias(b, sw, w, step, blocks.remainder)
        coef, shift = None, 0.0
        if self.offset is not None:
            product_step = step.double()
            folded = folded - sw * self.offset * float((product_step * blocks.remainder).sum())
            coef = (sw * self.offset).float()
            shift = float((product_step * (zero_point.double() - blocks.remainder)).sum())  # sum_c s_c zi_c
        return _GroupedTerms(order, bounds, packs, blocks.steps, blocks.zero_points, scale.float().contiguous(),
                             zero_point.float().contiguous(), folded.float().contiguous(), coef, shift,
                             multiplier)

    def _step_multiplier(self, step: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """Product steps that are power-of-two multiples m_c of the smallest one (`input_step_levels`) can live in the
        int8 columns, W[:, c] * m_c, where that still fits int8 (<= 5-bit weight rows with 4 levels): then the layer
        is one GEMM on the codes in place, with no per-level blocks to gather. m (int32 [K]), or None."""
        if self.offset is not None:
            return None
        multiplier = step.double() / float(step.min())
        if bool((multiplier == 1).all()) or not torch.equal(multiplier, multiplier.round()) or (
                float(multiplier.max()) > 127):
            return None
        multiplier = multiplier.to(torch.int32)
        largest = torch.zeros(self.in_features, dtype=torch.int32)  # max_o |W[o, c]|, a block of rows at a time
        for start, end in row_blocks(self.out_features, self.in_features):
            torch.maximum(largest, w[start:end].to(torch.int16).abs().amax(dim=0), out=largest)
        return multiplier if int((largest * multiplier).max()) <= 127 else None

    def whole_pack(self) -> torch.Tensor:
        """The prepacked [N, K] matrix (rebuilt if a grouped grid released it)."""
        if self.packed is None:
            self.packed = torch.ops.onednn.qlinear_prepack(self.int8_weight().contiguous(), None)
        return self.packed

    def int8_weight(self) -> torch.Tensor:
        """W = qw - t (int8 [N, K]), recomputed from the stored codes (only the prepacked form is kept), or read
        back from the prepacked matrix after `release()`."""
        if self.source.codes is None:  # oneDNN gives each prepacked [N, K'] matrix back as [K', N]
            if self.packed is not None:
                return self.packed.to_dense().t().contiguous()
            if self.stack is not None:
                stacked, start, end = self.stack
                return stacked.packed.to_dense().t()[start:end].contiguous()
            terms = self._terms  # released and grouped: the per-group packs hold the columns
            if terms.multiplier is not None:  # one pack of W * multiplier
                return (terms.packs[0].to_dense().t().to(torch.int32) // terms.multiplier).to(torch.int8)
            w = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
            for (start, end), pack in zip(terms.bounds, terms.packs, strict=True):
                w[:, terms.order[start:end]] = pack.to_dense().t()
            return w
        return int8_rows(self.source).weight

    def __reduce__(self):
        # The MKLDNN tensor cannot be pickled or deep-copied: rebuild it from the stored codes instead.
        return _rebuild, (self.stored(),)


def _prepare_linear(weight: PackedWeight) -> OneDNNWeight | None:
    """The oneDNN layout of a 2-d weight, or None when the integer path cannot represent it exactly."""
    rows = int8_rows(weight)
    if rows is None:
        return None  # a fractional weight zero point has no integer form
    out_features, in_features = weight.shape
    w = rows.weight.contiguous()
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    return OneDNNWeight(
        packed=packed,
        in_features=in_features,
        out_features=out_features,
        weight_scale=weight.scale.detach().reshape(-1).float().clone().contiguous(),
        weight_zero_points=torch.zeros(out_features, dtype=torch.int64),
        row_sum=rows.row_sum.double(),
        offset=rows.offset,
        source=weight,
    )


def _rebuild(source: PackedWeight) -> OneDNNWeight | torch.Tensor:
    prepared = _prepare_linear(source) if supported() else None
    return prepared if prepared is not None else dequantize_weight(source, torch.float32)


@dataclass(eq=False)
class StackedWeight:
    """Layers that read the same input (q, k, v), their int8 rows stacked into one prepacked [sum N, K] matrix: one
    oneDNN call instead of one per layer (at batch 1 each call costs ~60 us however small: DINOv2-S's q, k and v are
    65 x 384 x 384 each). The members' own prepacked matrices are dropped (`OneDNNWeight.stack` points here), so the
    weights are held once."""

    members: tuple[weakref.ref, ...]  # the members' `OneDNNWeight`s (weakly: they hold this stack)
    bounds: tuple[tuple[int, int], ...]  # [start, end) rows of each member
    packed: torch.Tensor  # opaque MKLDNN int8 tensor
    in_features: int
    weight_scale: torch.Tensor  # float32 [sum N]
    weight_zero_points: torch.Tensor  # int64 zeros [sum N]
    _terms_key: tuple | None = field(default=None, repr=False)
    _terms: _Terms | None = field(default=None, repr=False)

    def terms(self, grid: ActivationGrid, biases: list[torch.Tensor | None]) -> _Terms | None:
        """The members' per-tensor terms on `grid`, stacked (None where a member has none, or grouped ones)."""
        members = [ref() for ref in self.members]
        if any(member is None or member.stack is None or member.stack[0] is not self for member in members):
            return None  # a member was rebuilt since
        parts = [member.terms(grid, bias) for member, bias in zip(members, biases, strict=True)]
        if not all(isinstance(part, _Terms) for part in parts):
            return None
        if self._terms_key is not None and all(a is b for a, b in zip(parts, self._terms_key, strict=True)):
            return self._terms
        first = parts[0]
        if any(part.scale != first.scale or part.zero_point != first.zero_point for part in parts):
            return None  # not one grid after all
        coef = None
        if any(part.coef is not None for part in parts):
            coef = torch.cat([part.coef if part.coef is not None else torch.zeros(member.out_features)
                              for part, member in zip(parts, members, strict=True)])
        self._terms = _Terms(first.scale, first.zero_point, torch.cat([part.bias for part in parts]), coef,
                             first.code_scale, first.code_zero_point)
        self._terms_key = tuple(parts)
        return self._terms


def _stack(members: list[OneDNNWeight]) -> StackedWeight:
    """The members' rows in one prepacked matrix; each member's own matrix is dropped for it."""
    ends = torch.tensor([member.out_features for member in members]).cumsum(0).tolist()
    bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
    packed = torch.ops.onednn.qlinear_prepack(torch.cat([member.int8_weight() for member in members]), None)
    stacked = StackedWeight(tuple(weakref.ref(member) for member in members), bounds, packed,
                            members[0].in_features, torch.cat([member.weight_scale for member in members]),
                            torch.zeros(ends[-1], dtype=torch.int64))
    for member, (start, end) in zip(members, bounds, strict=True):
        member.stack, member.packed = (stacked, start, end), None
    return stacked


def _grouped_linear(x2: torch.Tensor, weight: OneDNNWeight, terms: _GroupedTerms, qmax: int) -> torch.Tensor:
    """One oneDNN GEMM per group of channels sharing a step (see `OneDNNWeight._grouped_terms`)."""
    if terms.order is None:
        blocks = [_quantize(x2, terms.scale, terms.zero_point, qmax)]  # per-channel grid, the reference's codes
    else:
        blocks = _quantize_into_groups(x2, terms, qmax)
    y = _kept_output(x2.shape[0], terms.bias)
    for block, pack, step, zi in zip(blocks, terms.packs, terms.scales, terms.zero_points, strict=True):
        if y is None:
            y = torch.ops.onednn.qlinear_pointwise(block, step, zi, pack, weight.weight_scale,
                                                   weight.weight_zero_points, terms.bias, 1.0, 0, torch.float32,
                                                   "none", [], "")
        else:  # accumulated into y by oneDNN's "sum" post-op (the same values as y.add_(part), no part tensor)
            _accumulate(y, block, step, zi, pack, weight)
    if terms.coef is not None:  # sum_c s_c (q_c - zi_c) per row; every channel of a group has the group's step
        weighted = None
        for block, step in zip(blocks, terms.scales, strict=True):
            part = _CODE_SUMS(block).double().mul_(step)
            weighted = part if weighted is None else weighted.add_(part)
        y.addr_(weighted.sub_(terms.shift).float(), terms.coef)
    return y


def _kept_output(rows: int, bias: torch.Tensor) -> torch.Tensor | None:
    """A reused output buffer holding `bias` in every row (`memory.OUTPUT_BUFFERS`), for the GEMM to add its product
    into with oneDNN's "sum" post-op: `(acc * scales) + bias`, the one float addition of the GEMM's own bias
    epilogue, so the same values; None (allocate a fresh output) for small outputs."""
    y = OUTPUT_BUFFERS.take(rows, bias.numel(), bias.device)
    return None if y is None else y.copy_(bias.expand_as(y))


def _accumulate(y: torch.Tensor, codes: torch.Tensor, step: float, zero_point: int, pack: torch.Tensor,
                weight: OneDNNWeight | StackedWeight) -> None:
    """y += (codes - zero_point) @ packᵀ * step * weight scales, in place (oneDNN's "sum" post-op)."""
    torch.ops.onednn.qlinear_pointwise.binary(codes, step, zero_point, pack, weight.weight_scale,
                                              weight.weight_zero_points, y, None, 1.0, 0, torch.float32, 1.0, 0,
                                              "sum", 1.0, "none", [], "")


def _quantize_into_groups(x2: torch.Tensor, terms: _GroupedTerms, qmax: int) -> list[torch.Tensor]:
    """The reference's uint8 codes of `x2` on the per-channel grid, as one contiguous [rows, K_g] matrix per group:
    quantized and gathered a block of rows at a time, so the gather reads a block that is still in cache instead of
    a whole [rows, K] matrix."""
    channels = [terms.order[start:end] for start, end in terms.bounds]
    groups = [torch.empty(x2.shape[0], c.numel(), dtype=torch.uint8, device=x2.device) for c in channels]
    buffer = torch.empty(min(x2.shape[0], _block_rows(x2.shape[1])), x2.shape[1], dtype=torch.uint8,
                         device=x2.device)
    for start, end, block in _code_blocks(x2, terms.scale, terms.zero_point, qmax):
        codes = store_codes(buffer[: end - start], block, qmax)
        for group, c in zip(groups, channels, strict=True):  # gather: several times faster than index_select on uint8
            torch.gather(codes, 1, c.expand(end - start, -1), out=group[start:end])
    return groups


# ---------------------------------------------------------------------------------------------- backend


class OneDNNBackend(IntegerBackend):
    name = "onednn"
    prepared_type = OneDNNWeight
    path_counts = PATH_COUNTS
    priority = 10  # preferred over the reference backend by "auto" where it is available
    groups_layers = True
    requirements = "a CPU with AVX512-VNNI, AVX-VNNI or AMX-INT8 and a torch build with oneDNN"

    def is_available(self, device: torch.device) -> bool:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            return False
        return device.type == "cpu" and supported()

    def prepare_weight(self, weight: PackedWeight, dtype: torch.dtype) -> Any:
        """An `OneDNNWeight` for float32 linear weights on a supported CPU; otherwise the reference backend's
        dequantized weight (convolutions, other dtypes or devices, fractional weight zero points)."""
        if (dtype == torch.float32 and len(weight.shape) == 2 and weight.codes.device.type == "cpu"
                and supported()):
            prepared = _prepare_linear(weight)
            if prepared is not None:
                return prepared
        return dequantize_weight(weight, dtype)

    def constants(self, weight: OneDNNWeight, grid: ActivationGrid, bias: torch.Tensor | None):
        return weight.terms(grid, bias)

    def integer_linear(self, x: torch.Tensor, x2: torch.Tensor, weight: OneDNNWeight, terms,
                       grid: ActivationGrid, activation: str | None = None) -> torch.Tensor:
        qmax = (1 << grid.bits) - 1
        if isinstance(terms, _GroupedTerms):
            return apply_activation(_grouped_linear(x2, weight, terms, qmax), activation)
        # GELU as oneDNN's post-op (erf form: the same values as torch's gelu) where nothing is added after the GEMM
        fused = activation == "gelu" and terms.coef is None
        y = _product(x, x2, weight.whole_pack(), weight, terms, grid, "gelu" if fused else "none")
        return y if fused else apply_activation(y, activation)

    def prepare_group(self, prepared: list[Any]) -> StackedWeight | None:
        """A `StackedWeight` of two or more `OneDNNWeight`s of the same width (others: None)."""
        if len(prepared) < 2 or not all(isinstance(p, OneDNNWeight) for p in prepared):
            return None
        if any(p.in_features != prepared[0].in_features for p in prepared):
            return None
        return _stack(prepared)

    @torch.compiler.disable
    def linear_group(self, x: torch.Tensor, group: Any, biases: list[torch.Tensor | None],
                     input_grid: ActivationGrid | None) -> list[torch.Tensor] | None:
        if not isinstance(group, StackedWeight) or not self.takes_input(x, group, input_grid):
            return None
        if torch.is_grad_enabled() and any(bias is not None and bias.requires_grad for bias in biases):
            return None  # the layers' own path carries the bias gradient
        terms = group.terms(input_grid, biases)
        if terms is None:
            return None
        self.path_counts["integer"] += len(biases)
        y = _product(x, x.reshape(-1, group.in_features), group.packed, group, terms, input_grid, "none")
        return [y[:, start:end].reshape(*x.shape[:-1], end - start) for start, end in group.bounds]


def _product(x: torch.Tensor, x2: torch.Tensor, pack: torch.Tensor, weight: OneDNNWeight | StackedWeight,
             terms: _Terms, grid: ActivationGrid, post_op: str) -> torch.Tensor:
    """`x2`'s codes on `grid` (shared with the other consumers of a producer's output) times `pack`, with the
    per-tensor `terms`, then oneDNN's `post_op` ("none" or "gelu"; only without a rank-1 term): float32 [rows, N]."""
    qmax = (1 << grid.bits) - 1
    codes = _SHARED_CODES.get(x, grid, qmax) if grid.shared else None
    if codes is None:
        codes = _quantize(x2, terms.code_scale, terms.code_zero_point, qmax)
        if grid.shared:
            _SHARED_CODES.put(x, grid, qmax, codes)
    y = _kept_output(codes.shape[0], terms.bias)
    if y is None:
        y = torch.ops.onednn.qlinear_pointwise(codes, terms.scale, terms.zero_point, pack, weight.weight_scale,
                                               weight.weight_zero_points, terms.bias, 1.0, 0, torch.float32, post_op,
                                               [], "none" if post_op != "none" else "")
    else:  # oneDNN has no GELU after its "sum": GELU in place, on memory still in cache from the GEMM's epilogue
        _accumulate(y, codes, terms.scale, terms.zero_point, pack, weight)
        if post_op == "gelu":
            torch.ops.aten.gelu_(y)
    if terms.coef is not None:
        row_sums = _SHARED_CODES.row_sums(codes) - weight.in_features * terms.zero_point
        y.addr_(row_sums, terms.coef)
    return y


register_backend(OneDNNBackend())
