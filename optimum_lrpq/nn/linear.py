"""`QuantLinear` and `QuantConv2d`: packed integer weights plus an optional input activation quantizer."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ACTIVATIONS, ConvGeometry
from .activation import UniformQuantizer
from .registry import QuantSpec, register_qmodule
from .weights import PackedWeightLayer


@register_qmodule(nn.Linear)
class QuantLinear(PackedWeightLayer):
    """Linear layer with `weight_bits` per-output-channel weights.

    `input_quant` quantizes the input per tensor, or per input channel with `input_per_channel` (one step per
    channel, applied when the producer's output is requantized); it is absent when the input was already quantized
    upstream (the output quantizer of a `QuantLayerNorm` feeding q/k/v, fc1 or Swin's patch-merging reduction).
    With `input_step_levels` G the input steps are split as s_c = level_c * r_c (level_c one of G powers of two,
    `quantization.step_groups.group_steps`), the stored weight is W·diag(r) and the layer computes
    `W' ((x_int - zero_point) * level)`: one integer GEMM per level even for a per-channel input grid.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_bits: int, input_bits: int | None,
                 dtype: torch.dtype = torch.float32, device=None, input_per_channel: bool = False,
                 input_step_levels: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if input_step_levels is not None and input_bits is None:
            raise ValueError("input_step_levels needs the layer's own input quantizer (input_bits).")
        self.input_step_levels = input_step_levels
        self._init_frozen((out_features, in_features), weight_bits, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        channels = in_features if input_per_channel else None
        self.input_quant = (UniformQuantizer(input_bits, channels=channels, device=device)
                            if input_bits is not None else None)
        # applied to the output (`nn.fusion`): the MLP activation this layer feeds, moved in here; not saved, the
        # conversion sets it again when a checkpoint is loaded
        self.activation: str | None = None

    def take_activation(self, activation: str) -> None:
        """Apply `activation` (one of `kernels.ACTIVATIONS`) to this layer's output from now on."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"QuantLinear cannot apply activation {activation!r}; it applies {ACTIVATIONS}.")
        self.activation = activation

    @classmethod
    def skeleton(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """The empty frozen layer (meta device) a checkpoint is loaded into."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None or spec.force_bias,
                   spec.weight_bits, spec.input_bits, dtype=linear.weight.dtype, device="meta",
                   input_per_channel=spec.input_per_channel, input_step_levels=spec.input_step_levels)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """Wrap a float Linear (weights still float until `freeze()`); `force_bias` adds a zero bias if absent."""
        w = linear.weight
        force_bias = spec.force_bias
        module = cls(linear.in_features, linear.out_features, linear.bias is not None or force_bias,
                     spec.weight_bits, spec.input_bits, dtype=w.dtype, device=w.device,
                     input_per_channel=spec.input_per_channel, input_step_levels=spec.input_step_levels)
        for name in ("qweight", "weight_scale", "weight_zero_point"):
            delattr(module, name)
        module.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        elif module.bias is not None:
            module.bias.requires_grad_(False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_input_group")  # q, k and v computed as one product (`nn.fusion`)
        if group is not None:
            y = group.output(self, x)
            if y is not None:
                return y
        return self.compute(x, self.input_quant, "linear", self.activation)

    def extra_repr(self) -> str:
        folded = f", input_step_levels={self.input_step_levels}" if self.input_step_levels is not None else ""
        activation = f", activation={self.activation}" if self.activation is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}"
                f"{folded}{activation}")


@register_qmodule(nn.Conv2d)
class QuantConv2d(PackedWeightLayer):
    """Conv2d (the patch embedding) with per-output-filter weights and a per-tensor input quantizer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride, padding, dilation,
                 groups: int, bias: bool, weight_bits: int, input_bits: int | None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), stride, padding
        self.dilation, self.groups = dilation, groups
        self._init_frozen((out_channels, in_channels // groups, *self.kernel_size), weight_bits, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None
        self.input_quant = UniformQuantizer(input_bits, device=device) if input_bits is not None else None

    @classmethod
    def skeleton(cls, conv: nn.Conv2d, spec: QuantSpec) -> QuantConv2d:
        """The empty frozen layer (meta device) a checkpoint is loaded into."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, spec.weight_bits, spec.input_bits, dtype=conv.weight.dtype,
                   device="meta")

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec) -> QuantConv2d:
        """Wrap a float Conv2d (weights still float until `freeze()`)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        w = conv.weight
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, spec.weight_bits, spec.input_bits, dtype=w.dtype,
                     device=w.device)
        for name in ("qweight", "weight_scale", "weight_zero_point"):
            delattr(module, name)
        module.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if conv.bias is not None:
            module.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.input_quant, "conv2d",
                            ConvGeometry(self.stride, self.padding, self.dilation, self.groups))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"weight_bits={self.weight_bits}")
