"""The export form of a quantized model: its quantized modules rewritten as explicit quantize / dequantize steps.

At inference a quantized layer computes through a kernel backend (cached, prepacked layouts, eager-only code paths),
which no graph exporter can trace. `export_form(model, example)` swaps, for the duration of an export, every
quantized module for a twin that states the same arithmetic with operations an exporter maps to ONNX QDQ, and puts
the original modules back afterwards. Three `torch.library` custom ops carry the integer steps (translated by
`optimum_lrpq.export.onnx_export`; in PyTorch they compute exactly what the ONNX operators do):

- `lrpq::quantize(t, bits)`: round half to even, clamp to the `bits`-bit code range, uint8: `QuantizeLinear` with
  scale 1 and zero point 0 (+ `Clip` below 8 bits). The twins feed it t = x / scale + zero_point, the reference's
  own operations in its order (`quantization.uniform.quantize`), so the codes are the reference's bit for bit: a
  `QuantizeLinear` with the real scale rounds x / scale and adds the zero point afterwards, which differs at ties
  with an odd zero point (systematic on pixel values, e.g. (v / 255 - 0.5) / 0.5 on a grid of step 2 / 255) and
  cannot take a fractional zero point. It is also 20x faster in ONNX Runtime than a per-axis `QuantizeLinear`;
- `lrpq::dequantize(codes, scale, zero_point, axis)`: `DequantizeLinear` (uint8 activation codes; int8 weight codes
  with their per-output-channel scale and zero point). A per-tensor activation `DequantizeLinear` and a weight one
  feeding the same `MatMul` is what ONNX Runtime fuses into an integer GEMM (`MatMulIntegerToFloat`);
- `lrpq::shift_left(codes, shifts)`: `BitShift` of uint8 codes (per-channel power-of-two steps, below).

How each quantized part is written:

- weights: int8 initializers holding the stored codes of every width 2-8 (shifted by 128 at 8 bits, with the zero
  point), [in, out] so that the `DequantizeLinear` feeds the `MatMul` directly; no float copy is written;
- an activation grid with a whole zero point z: Q -> DQ(scale, z). A fractional zero point z = zi + f (the LayerNorm
  reparameterization makes one): the codes are the same (t carries z), the `DequantizeLinear` holds zi, and the rest
  of the dequantized value, -f * scale, is a constant the linear layers reading the tensor fold into their bias;
- per-input-channel grids (o_proj, fc2): the reference computes W' ((c - z) p) with one product step p per channel
  (`LRPQConfig.input_step_levels`: a few powers of two). With whole-power-of-two ratios and room in 8 bits (4- and
  5-bit codes) each channel's codes are shifted left by log2(p / p_min): one GEMM with the step p_min. Otherwise
  the channels of each step are gathered and multiplied as one GEMM each (slower: ONNX Runtime's Gather along the
  last axis). Every channel's zero point times its weight column is a constant folded into the bias. More than
  `MAX_INPUT_GROUPS` steps: (c - z) in float times the weight scaled by p per row, a float product (the readers of a
  per-channel LayerNorm grid, `reparameterize=False`, multiply in float too);
- per-axis activation grids that feed no linear layer (the attention operands q, k, v, per head) are dequantized in
  float operations, never by a per-axis `DequantizeLinear`: ONNX Runtime 1.17-1.23 fuses one that feeds a MatMul
  into `MatMulIntegerToFloat` and then fails at run time ("Per-Channel is not supported yet");
- a LayerNorm output that reaches its readers through padding, rolls and window partitions (Swin) is quantized by
  the readers after the data movement (quantizing element by element commutes with moving elements), so that ONNX
  Runtime sees Q -> DQ -> MatMul (it fuses no `DequantizeLinear` across `Pad` / `Concat` / `Slice`, and turns a
  float-input product on a `DequantizeLinear` weight into `MatMulNBits`, which quantizes the input to int8 blocks);
- the patch embedding (a convolution with stride = kernel) as patches x weight: a MatMul, integer in ONNX Runtime;
- the log2 / log√2 post-softmax quantizer in float operations (Log, Round, Clip, Exp): ONNX has no such operator.

Exactness: the codes are computed by the reference's operations, so in PyTorch the export form gives the reference
backend's outputs to float rounding (the folded bias constants change the order of additions). ONNX Runtime's float
kernels (LayerNorm, Softmax, GELU, Exp) differ from torch's in the last bits; where such a difference crosses a
rounding boundary a code moves by one step (about 1 in 10^5 to 10^6 activations). Swin at a resolution whose feature
maps are not whole windows pads a LayerNorm output with zeros, which the bias correction of a fractional zero point
also reaches: those padding tokens' q, k, v then differ from PyTorch's by that correction (the standard Swin sizes
need no padding).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ACTIVATIONS, apply_activation
from ..nn import (
    LogQuantizer,
    PackedWeightLayer,
    PerHeadQuantizer,
    QuantConv2d,
    QuantLayerNorm,
    QuantLinear,
    UniformQuantizer,
    is_quantized_module,
)
from ..nn.activation import ActivationQuantizer
from ..nn.attention import QUANTIZER_NAMES
from ..quantization import logarithmic, packing

# A per-channel input grid whose channels take at most this many distinct product steps (and cannot be shifted into
# one GEMM) runs one Gather + integer GEMM per step; beyond it, one float product.
MAX_INPUT_GROUPS = 8
UINT8_MAX = 255


class ExportError(ValueError):
    """The model cannot be exported; the message names what and how to fix it."""


# ------------------------------------------------------------------------------------------------------------------
# the custom ops the ONNX exporter translates (QuantizeLinear + Clip, DequantizeLinear, BitShift)
# ------------------------------------------------------------------------------------------------------------------


def _along(tensor: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-tensor (0-d) or per-axis (1-d) grid tensor, viewed to broadcast against an `ndim`-d input."""
    if tensor.dim() == 0:
        return tensor
    shape = [1] * ndim
    shape[axis] = -1
    return tensor.reshape(shape)


@torch.library.custom_op("lrpq::quantize", mutates_args=())
def quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes clamp(round(t), 0, 2**bits - 1), rounding half to even (ONNX: QuantizeLinear(t, 1, 0) + Clip)."""
    return torch.round(t.float()).clamp_(0, (1 << bits) - 1).to(torch.uint8)


@quantize.register_fake
def _(t, bits):
    return torch.empty(t.shape, dtype=torch.uint8, device=t.device)


@torch.library.custom_op("lrpq::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX DequantizeLinear: (codes - zero_point) * scale in float32; uint8 or int8 codes and zero point, per tensor
    (0-d scale) or per `axis`."""
    shifted = codes.to(torch.int32) - _along(zero_point, codes.dim(), axis).to(torch.int32)
    return shifted.float() * _along(scale, codes.dim(), axis)


@dequantize.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lrpq::shift_left", mutates_args=())
def shift_left(codes: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """uint8 codes shifted left by `shifts` (broadcast over the last dimension; the caller keeps the result < 256)
    (ONNX: BitShift, direction LEFT)."""
    return (codes.to(torch.int32) << shifts.to(torch.int32)).to(torch.uint8)


@shift_left.register_fake
def _(codes, shifts):
    return torch.empty(codes.shape, dtype=torch.uint8, device=codes.device)


def dequantize_per_axis(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """(codes - zero_point) * scale per `axis` in float operations (Cast, Sub, Mul), for grids that no integer GEMM
    can take (see the module doc: not a per-axis DequantizeLinear)."""
    return (codes.float() - _along(zero_point, codes.dim(), axis)) * _along(scale, codes.dim(), axis)


# ------------------------------------------------------------------------------------------------------------------
# activation grids
# ------------------------------------------------------------------------------------------------------------------


def _whole(values: torch.Tensor, where: str, what: str = "zero point") -> torch.Tensor:
    """`values` rounded to whole uint8 numbers, or an ExportError when they leave [0, 255]."""
    rounded = torch.round(values.double())
    if bool(((rounded < 0) | (rounded > UINT8_MAX)).any()):
        raise ExportError(f"{where}: {what} outside [0, 255] ({values.min().item():g} .. {values.max().item():g}); "
                          "the checkpoint is corrupt or was edited by hand.")
    return rounded.to(torch.uint8)


class QuantDequant(nn.Module):
    """An activation quantizer as Q -> DQ on its uniform grid, per tensor or per `axis` (1: per attention head, -1:
    the last dimension).

    `quantize` gives the reference's codes (see the module doc); `dequantize` gives (codes - zi) * scale with zi the
    whole part of the zero point (`dq_zero_point`). The rest, `residual` = (zi - z) * scale (None for a whole zero
    point), is added after the dequantization unless `fold_residual`: then the linear layers reading the output
    fold it into their bias."""

    def __init__(self, quantizer: UniformQuantizer, where: str, axis: int | None = None, fold_residual: bool = False):
        super().__init__()
        self.bits = quantizer.bits
        per_axis = quantizer.scale.numel() > 1
        if per_axis and axis is None:
            raise ExportError(f"{where}: a per-channel grid needs an axis.")
        self.axis = axis if per_axis else None
        shape = quantizer.scale.shape if per_axis else ()
        scale = quantizer.scale.detach().float().reshape(shape).clone()
        zero_point = quantizer.zero_point.detach().float().reshape(shape).clone()
        whole = torch.floor(zero_point)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("dq_zero_point", _whole(whole, where))
        self.register_buffer("residual", None if bool((whole == zero_point).all()) else (whole - zero_point) * scale)
        self.fold_residual = fold_residual

    def copy(self, fold_residual: bool, whole_zero_point: bool = False) -> QuantDequant:
        """The same grid for another owner (a layer that quantizes the same tensor again); `whole_zero_point`: for a
        tensor that already lies on the dequantized grid (c - zi) * scale, whose codes come back with zi."""
        twin = QuantDequant.__new__(QuantDequant)
        nn.Module.__init__(twin)
        twin.bits, twin.axis, twin.fold_residual = self.bits, self.axis, fold_residual
        for name, buffer in self._buffers.items():
            twin.register_buffer(name, None if buffer is None else buffer.clone())
        if whole_zero_point:
            twin.zero_point = self.dq_zero_point.float()
        return twin

    def resolved_axis(self, ndim: int) -> int:
        return 0 if self.axis is None else self.axis % ndim

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of `x`: round(x / scale + zero_point), clamped to the code range."""
        axis = self.resolved_axis(x.dim())
        t = x.float() / _along(self.scale, x.dim(), axis) + _along(self.zero_point, x.dim(), axis)
        return torch.ops.lrpq.quantize(t, self.bits)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """(codes - zi) * scale: a DequantizeLinear per tensor, float operations per axis."""
        if self.axis is None:
            return torch.ops.lrpq.dequantize(codes, self.scale, self.dq_zero_point, 0)
        return dequantize_per_axis(codes, self.scale, self.dq_zero_point, self.resolved_axis(codes.dim()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dequantize(self.quantize(x))
        if self.residual is not None and not self.fold_residual:
            y = y + _along(self.residual, y.dim(), self.resolved_axis(y.dim()))
        return y.to(x.dtype)


class LogQuantDequant(nn.Module):
    """The log2 / log√2 post-softmax quantizer (`quantization.logarithmic`) in float operations ONNX has:

        q = clamp(round(ln(x) * -k / ln 2 + k * log2(scale)), 0, 2**bits)      # = round(-k * log2(x / scale))
        x_hat = exp(q * -ln 2 / k + ln(scale)) * (q < 2**bits)                 # = scale * 2**(-q / k), or 0

    ln(.) / ln 2 stands for log2 (no ONNX operator) and exp for exp2: they differ from torch's in the last bit, which
    moves a probability to the neighbouring level only where it lies on a level boundary to float precision.
    Probabilities are >= 0 (a negative input, which the reference maps to 0, would give NaN here)."""

    def __init__(self, quantizer: LogQuantizer):
        super().__init__()
        self.bits = quantizer.bits
        k = 2.0 if quantizer.sqrt2 else 1.0
        scale = float(quantizer.scale.detach().double().reshape(()))
        self.to_level = -k / math.log(2.0)
        self.level_offset = k * math.log2(scale)
        self.from_level = -math.log(2.0) / k
        self.value_offset = math.log(scale)
        self.zero_code = float(logarithmic.zero_code(self.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(torch.log(x.float()) * self.to_level + self.level_offset)
        q = torch.clamp(q, 0.0, self.zero_code)  # log(0) = -inf -> +inf -> the zero code
        value = torch.exp(q * self.from_level + self.value_offset)
        # times a 0/1 mask rather than a Where: ONNX Runtime's Where is ~7x slower than Less + Cast + Mul
        return (value * (q < self.zero_code).float()).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------------
# weight layers
# ------------------------------------------------------------------------------------------------------------------


def _int8_weight(layer: PackedWeightLayer, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes [out, row], float32 scale [out], int8 zero point [out]) of a frozen layer: codes of every width
    2-8 held as int8 (8-bit codes and zero points shifted by 128, which leaves code - zero point unchanged)."""
    bits = layer.weight_bits
    codes = packing.unpack(layer.codes(), bits, math.prod(layer.weight_shape[1:])).to(torch.int16)
    zero_point = layer.weight_zero_point.detach().float()
    qmax = (1 << bits) - 1
    if bool((zero_point != torch.round(zero_point)).any()) or bool(((zero_point < 0) | (zero_point > qmax)).any()):
        raise ExportError(f"{where}: weight zero points are not whole numbers in [0, {qmax}], which an int8 "
                          "DequantizeLinear cannot hold; the checkpoint is corrupt or was edited by hand.")
    offset = 128 if bits == 8 else 0
    return ((codes - offset).to(torch.int8), layer.weight_scale.detach().float().clone(),
            (zero_point.to(torch.int16) - offset).to(torch.int8))


class ExportLinear(nn.Module):
    """`QuantLinear` as QDQ: its input's codes, their DequantizeLinear, the int8 weight's DequantizeLinear, MatMul,
    bias (with the folded constants), activation.

    The input is quantized by the layer's own grid (`input_quant`, see `_own_input` for per-channel grids), or arrives
    quantized by a `QuantLayerNorm` (`source`: its fractional zero point's residual is folded into the bias). With
    `requantize` the source's output reaches this layer changed on the way (padded, shifted into windows): it is
    quantized here, on the source's grid (`source_quantized`: it already lies on the dequantized grid)."""

    def __init__(self, layer: QuantLinear, where: str, source: QuantDequant | None = None, requantize: bool = False,
                 source_quantized: bool = True):
        super().__init__()
        codes, scale, zero_point = _int8_weight(layer, where)  # [out, in]
        # what the reference backend multiplies by (float64 for the constants folded into the bias)
        weight = (codes.double() - zero_point.double()[:, None]) * scale.double()[:, None]
        bias = (layer.bias.detach().double().clone() if layer.bias is not None
                else torch.zeros(layer.out_features, dtype=torch.float64, device=codes.device))
        if layer.activation is not None and layer.activation not in ACTIVATIONS:
            raise ExportError(f"{where}: activation {layer.activation!r} cannot be exported.")
        self.activation = layer.activation
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.input: QuantDequant | None = None
        self.requantize: QuantDequant | None = None
        # how the input reaches the product: "codes" (one DequantizeLinear), "shifted" (codes shifted to one step),
        # "gathered" (one Gather + DequantizeLinear per step), "float_codes" (a float product), "float" (no grid)
        self.mode = "codes"
        self.register_buffer("shifts", None)
        self.register_buffer("row_steps", None)
        groups: list[tuple[torch.Tensor | None, torch.Tensor]] = [(None, codes)]
        if layer.input_quant is not None:
            bias, groups = self._own_input(layer, where, codes, weight, bias)
        elif source is not None:
            if source.residual is not None:
                bias = bias + weight @ source.residual.double().expand(layer.in_features)
            if requantize:
                self.requantize = source.copy(fold_residual=True, whole_zero_point=source_quantized)
            if source.axis is not None:  # a per-channel LayerNorm grid (reparameterize=False): no integer GEMM
                self.mode = "float"
        else:
            self.mode = "float"
        if self.mode == "float":
            # a float input (no grid, or one per channel): a float product whose weight DequantizeLinear feeds a Mul,
            # not the MatMul, so ONNX Runtime does not make it a MatMulNBits (which quantizes the input to int8 blocks)
            self.register_buffer("row_steps", torch.ones(layer.in_features, 1, device=codes.device))
        for index, (channels, group_codes) in enumerate(groups):
            # [in, out]: the DequantizeLinear feeds the MatMul directly, with the weight's scale along axis 1
            self.register_buffer(f"weight_{index}", group_codes.t().contiguous())
            self.register_buffer(f"channels_{index}", channels)
        self.groups = len(groups)
        self.register_buffer("bias", bias.float())

    def _own_input(self, layer: QuantLinear, where: str, codes: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The input quantizer, the weight groups, and the bias with the constant terms folded in.

        The reference computes W' ((c - z) p): codes c, zero points z and product steps p per input channel (p is
        the step itself without `input_step_levels`). Every form below multiplies integer codes c' by a per-tensor
        step with a whole zero point d, and W' ((c - z) p - (c' - d) p') is a constant in the bias."""
        quant = layer.input_quant
        self.input = QuantDequant(quant, f"{where}.input_quant", axis=-1, fold_residual=True)
        features = weight.shape[1]
        z = quant.zero_point.detach().double().expand(features)
        step = layer.input_product_step()
        step = (quant.scale if step is None else step).detach().float().expand(features).contiguous()
        levels = torch.unique(step)
        if levels.numel() == 1:  # one step: one DequantizeLinear
            d = _whole(z.mean(), where)
            self._group_buffers(0, levels[0], d)
            return bias - weight @ ((z - d.double()) * step.double()), [(None, codes)]
        ratios = step.double() / levels[0].double()
        shifts = torch.round(torch.log2(ratios))
        qmax = (1 << quant.bits) - 1
        if bool((torch.exp2(shifts) == ratios).all()) and qmax << int(shifts.max()) <= UINT8_MAX:
            # powers of two that fit in 8 bits: c' = c << log2(p / p_min), one GEMM with the step p_min
            self.mode = "shifted"
            self.register_buffer("shifts", shifts.to(torch.uint8))
            scaled_z = z * torch.exp2(shifts)
            d = _whole(scaled_z.mean(), where)
            self._group_buffers(0, levels[0], d)
            return bias - weight @ ((scaled_z - d.double()) * levels[0].double()), [(None, codes)]
        if levels.numel() <= MAX_INPUT_GROUPS:  # one Gather + GEMM per step
            self.mode = "gathered"
            groups = []
            for index, level in enumerate(levels.flip(0)):
                channels = torch.nonzero(step == level).flatten()
                d = _whole(z[channels].mean(), where)
                self._group_buffers(index, level, d)
                bias = bias - weight[:, channels] @ ((z[channels] - d.double()) * level.double())
                groups.append((channels, codes[:, channels]))
            return bias, groups
        # too many steps for integer GEMMs: (c - z) in float, times the weight with each row scaled by its step
        self.mode = "float_codes"
        self.register_buffer("row_steps", step[:, None].clone())
        self.register_buffer("zero_points", quant.zero_point.detach().float().expand(features).clone())
        return bias, [(None, codes)]

    def _group_buffers(self, index: int, step: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.register_buffer(f"step_{index}", step.detach().float().reshape(()).clone())
        self.register_buffer(f"dq_zero_point_{index}", zero_point.reshape(()).clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (model code may read `.weight.dtype`)."""
        parts = [torch.ops.lrpq.dequantize(getattr(self, f"weight_{i}"), self.weight_scale, self.weight_zero_point, 1)
                 for i in range(self.groups)]
        if self.groups == 1:
            return parts[0].t()
        order = torch.argsort(torch.cat([getattr(self, f"channels_{i}") for i in range(self.groups)]))
        return torch.cat(parts).index_select(0, order).t()

    def _inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What each weight group multiplies."""
        if self.requantize is not None:
            x = self.requantize(x)
        if self.input is None:
            return [x]
        codes = self.input.quantize(x)
        last = x.dim() - 1
        if self.mode == "float_codes":
            return [codes.float() - self.zero_points]
        if self.mode == "shifted":
            codes = torch.ops.lrpq.shift_left(codes, self.shifts)
        inputs = []
        for index in range(self.groups):
            channels = getattr(self, f"channels_{index}")
            group = codes if channels is None else torch.index_select(codes, last, channels)
            inputs.append(torch.ops.lrpq.dequantize(group, getattr(self, f"step_{index}"),
                                                    getattr(self, f"dq_zero_point_{index}"), 0))
        return inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # [batch, features] (a classifier): ONNX Runtime turns a 2-d MatMul + Add into a float Gemm before its
            # QDQ fusion, so it gets the 3-d form every other layer has
            return self.forward(x.unsqueeze(1)).squeeze(1)
        y = None
        for index, value in enumerate(self._inputs(x)):
            weight = torch.ops.lrpq.dequantize(getattr(self, f"weight_{index}"), self.weight_scale,
                                               self.weight_zero_point, 1)
            if self.row_steps is not None:  # float product: a DequantizeLinear that feeds no MatMul directly
                weight = weight * self.row_steps
            product = torch.matmul(value, weight)
            # the bias right after the first product: ONNX Runtime folds MatMul + Add into one GEMM with bias
            y = product + self.bias if y is None else y + product
        return apply_activation(y, self.activation).to(x.dtype)


class ExportConv2d(nn.Module):
    """`QuantConv2d` (the patch embedding) as QDQ. A patch embedding (stride = kernel size, no padding, dilation 1,
    one group) is written as patches x weight: a MatMul that ONNX Runtime runs as an integer GEMM (it fuses no
    DequantizeLinear into a Conv without a QuantizeLinear after it); the same products and sums. Another convolution
    stays a Conv on the dequantized input and weight (float in ONNX Runtime)."""

    def __init__(self, layer: QuantConv2d, where: str):
        super().__init__()
        codes, scale, zero_point = _int8_weight(layer, where)  # [out, in * kh * kw]
        pair = nn.modules.utils._pair
        self.kernel_size = tuple(layer.kernel_size)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.patches = (pair(self.stride) == self.kernel_size and pair(self.padding) == (0, 0)
                        and pair(self.dilation) == (1, 1) and self.groups == 1)
        self.weight_shape = layer.weight_shape
        self.register_buffer("qweight", codes.t().contiguous() if self.patches else codes.reshape(layer.weight_shape))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        bias = layer.bias.detach().double().clone() if layer.bias is not None else None
        self.input = None
        if layer.input_quant is not None:
            self.input = QuantDequant(layer.input_quant, f"{where}.input_quant", fold_residual=self.patches)
            if self.input.residual is not None and self.patches:
                weight = (codes.double() - zero_point.double()[:, None]) * scale.double()[:, None]
                residual = weight @ self.input.residual.double().expand(weight.shape[1])
                bias = residual if bias is None else bias + residual
        self.register_buffer("bias", None if bias is None else bias.float())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (model code reads `projection.weight.dtype` to cast its input)."""
        if self.patches:
            weight = torch.ops.lrpq.dequantize(self.qweight, self.weight_scale, self.weight_zero_point, 1)
            return weight.t().reshape(self.weight_shape)
        return torch.ops.lrpq.dequantize(self.qweight, self.weight_scale, self.weight_zero_point, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patches:
            if self.input is not None:
                x = self.input(x)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        batch, channels, height, width = x.shape
        kh, kw = self.kernel_size
        rows, cols = height // kh, width // kw
        x = x[:, :, : rows * kh, : cols * kw]  # a strided convolution drops what is left over
        # [batch, rows * cols, channels * kh * kw]: each patch in the order of the weight's rows
        x = x.reshape(batch, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(batch, rows * cols, channels * kh * kw)
        if self.input is not None:
            x = self.input(x)  # after the reshapes: the DequantizeLinear feeds the MatMul
        weight = torch.ops.lrpq.dequantize(self.qweight, self.weight_scale, self.weight_zero_point, 1)
        y = torch.matmul(x, weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)


class ExportLayerNorm(nn.Module):
    """`QuantLayerNorm` as LayerNorm, then its output's Q -> DQ when `quantize_output` (else its readers quantize it
    after moving it: `ExportLinear(requantize=True)`)."""

    def __init__(self, layernorm: QuantLayerNorm, where: str, fold_residual: bool, quantize_output: bool = True):
        super().__init__()
        self.normalized_shape, self.eps = tuple(layernorm.normalized_shape), layernorm.eps
        self.out = QuantDequant(layernorm.out_quant, f"{where}.out_quant", axis=-1, fold_residual=fold_residual)
        self.quantize_output = quantize_output
        for name in ("weight", "bias"):
            value = getattr(layernorm, name)
            self.register_buffer(name, None if value is None else value.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.out(y) if self.quantize_output else y


# ------------------------------------------------------------------------------------------------------------------
# swapping
# ------------------------------------------------------------------------------------------------------------------


def check_exportable(model: nn.Module) -> None:
    """An ExportError naming the first module that keeps `model` from being exported: still calibrating, not frozen,
    not in memory, or not float32."""
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and module.observer is not None:
            raise ExportError(f"{name} is still calibrating (an observer is attached); export a finished quantized "
                              "model (LRPQuantizer.quantize_model returns one).")
        if isinstance(module, PackedWeightLayer) and not module.is_frozen:
            raise ExportError(f"{name} still has its float weight (not frozen); export a finished quantized model "
                              "(LRPQuantizer.quantize_model returns one).")
        if is_quantized_module(module) or isinstance(module, ActivationQuantizer):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                if tensor.is_meta:
                    raise ExportError(f"{name} has no data (meta device, e.g. offloaded by accelerate); load the "
                                      "model fully into memory to export it.")
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    raise ExportError(f"{name} holds {tensor.dtype} tensors; the export writes float32 graphs: "
                                      "load the model in float32 (model.float()).")


def _readers(model: nn.Module, layernorms: dict[str, QuantLayerNorm],
             example: torch.Tensor) -> tuple[dict[str, list[str]], set[str]]:
    """For each QuantLayerNorm, the quantized linear layers that read its quantized output (`input_source`), and the
    set of those that receive it changed on the way (padded, shifted, partitioned: not the LayerNorm's output tensor
    itself), found by running `example` once."""
    by_quantizer = {id(m.out_quant): n for n, m in layernorms.items()}
    readers: dict[str, list[str]] = {n: [] for n in layernorms}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.input_source is not None:
            source = by_quantizer.get(id(module.input_source))
            if source is None:
                raise ExportError(f"{name} reads a quantized input whose producer is not a QuantLayerNorm of this "
                                  "model; the export cannot tell where its grid is applied.")
            readers[source].append(name)
    outputs: dict[str, torch.Tensor] = {}  # the tensors themselves: a later tensor may reuse a freed one's id
    direct: dict[str, bool] = {}
    handles = []
    for name, layernorm in layernorms.items():
        handles.append(layernorm.register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out)))
        for reader in readers[name]:
            handles.append(model.get_submodule(reader).register_forward_pre_hook(
                lambda module, args, name=name, reader=reader: direct.__setitem__(
                    reader, direct.get(reader, True) and args[0] is outputs.get(name))))
    try:
        with torch.no_grad():
            model(pixel_values=example)
    finally:
        for handle in handles:
            handle.remove()
    return readers, {r for rs in readers.values() for r in rs if not direct.get(r, False)}


@contextlib.contextmanager
def export_form(model: nn.Module, example: torch.Tensor) -> Iterator[nn.Module]:
    """`model` with its quantized modules swapped for their QDQ twins (see the module doc) while the block runs; the
    original modules are put back afterwards, whatever happens. `example` (pixel values) is run once to see how each
    LayerNorm's output reaches the layers that read it."""
    check_exportable(model)
    layernorms = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerNorm)}
    readers, indirect = _readers(model, layernorms, example)
    twins: dict[str, nn.Module] = {}
    source_of: dict[str, ExportLayerNorm] = {}
    for name, layernorm in layernorms.items():
        # a fractional zero point's residual goes into the readers' biases; with no reader known it stays here
        quantize_output = not readers[name] or any(r not in indirect for r in readers[name])
        twins[name] = ExportLayerNorm(layernorm, name, fold_residual=bool(readers[name]),
                                      quantize_output=quantize_output)
        source_of.update({reader: twins[name] for reader in readers[name]})
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            source = source_of.get(name)
            twins[name] = ExportLinear(module, name, None if source is None else source.out,
                                       requantize=name in indirect,
                                       source_quantized=source is not None and source.quantize_output)
        elif isinstance(module, QuantConv2d):
            twins[name] = ExportConv2d(module, name)
        elif is_quantized_module(module) and not isinstance(module, QuantLayerNorm):
            raise ExportError(f"{name} ({type(module).__name__}) has no export form.")
        for attr in QUANTIZER_NAMES:  # the quantizers of the `lrpq` attention function
            quant = module._modules.get(attr)
            if quant is None:
                continue
            where = f"{name}.{attr}"
            if isinstance(quant, LogQuantizer):
                twins[where] = LogQuantDequant(quant)
            elif isinstance(quant, UniformQuantizer):
                twins[where] = QuantDequant(quant, where, axis=1 if isinstance(quant, PerHeadQuantizer) else -1)
            else:
                raise ExportError(f"{where} ({type(quant).__name__}) has no export form.")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, twin in twins.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, parent._modules[attr]))
            setattr(parent, attr, twin)
        left = [n for n, m in model.named_modules() if is_quantized_module(m) or isinstance(m, ActivationQuantizer)]
        if left:
            raise ExportError(f"{left[0]} ({type(model.get_submodule(left[0])).__name__}) is not used through a "
                              "layer the export knows, so it has no export form.")
        yield model
    finally:
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)
