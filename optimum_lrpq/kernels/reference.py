"""The reference backend: dequantize the weight to float once, fake-quantize the input, multiply in float.

It is the oracle the other backends are tested against, and what calibration, relevance and sensitivity run on
(they need float gradients or observe float activations). Every device and dtype supports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quantization import packing, uniform
from .backend import ActivationGrid, ConvGeometry, KernelBackend, PackedWeight, apply_activation, register_backend


def dequantize_weight(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight the codes stand for, in its original shape."""
    codes = packing.unpack(weight.codes, weight.bits, math.prod(weight.shape[1:])).float()
    rows = uniform.dequantize(codes, weight.scale[:, None], weight.zero_point[:, None])
    return rows.reshape(weight.shape).to(dtype)


def quantize_input(x: torch.Tensor, grid: ActivationGrid | None) -> torch.Tensor:
    """`x` fake-quantized on `grid` (unchanged when there is no grid or it was already applied upstream); with a
    `product_step`, `(x_int - zero_point) * product_step` (the weight columns carry the rest of the step)."""
    if grid is None or grid.applied:
        return x
    if grid.product_step is not None:
        codes = uniform.quantize(x.float(), grid.scale, grid.zero_point, grid.bits)
        return uniform.dequantize(codes, grid.product_step, grid.zero_point).to(x.dtype)
    return uniform.fake_quantize(x, grid.scale, grid.zero_point, grid.bits)


class ReferenceBackend(KernelBackend):
    name = "reference"

    def is_available(self, device: torch.device) -> bool:
        return True

    def prepare_weight(self, weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(weight, dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               input_grid: ActivationGrid | None, activation: str | None = None) -> torch.Tensor:
        return apply_activation(F.linear(quantize_input(x, input_grid), weight, bias), activation)

    def conv2d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               input_grid: ActivationGrid | None, geometry: ConvGeometry) -> torch.Tensor:
        return F.conv2d(quantize_input(x, input_grid), weight, bias, geometry.stride, geometry.padding,
                        geometry.dilation, geometry.groups)


register_backend(ReferenceBackend())
