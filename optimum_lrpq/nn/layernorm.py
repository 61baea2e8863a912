"""`QuantLayerNorm`: a LayerNorm (computed in floating point) whose output is quantized.

It keeps LayerNorm's `weight`/`bias` names, so checkpoints stay key-compatible, and adds a child `out_quant`.
Its output feeds q/k/v, fc1 or Swin's patch-merging reduction, whose inputs are therefore already quantized.
During calibration `out_quant` is per channel; the reparameterization (`optimum_lrpq.quantization.reparameterization`)
folds the per-channel grid into this LayerNorm's affine and the next linear, leaving one per-tensor grid.
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import UniformQuantizer
from .registry import QuantSpec, register_qmodule


@register_qmodule(nn.LayerNorm)
class QuantLayerNorm(nn.LayerNorm):
    def __init__(self, normalized_shape, eps: float, elementwise_affine: bool, bias: bool, out_bits: int,
                 per_channel: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        channels = self.normalized_shape[-1] if per_channel else None
        self.out_quant = UniformQuantizer(out_bits, channels=channels, device=device)

    @classmethod
    def skeleton(cls, layernorm: nn.LayerNorm, spec: QuantSpec) -> QuantLayerNorm:
        """The empty layer (meta device) a checkpoint is loaded into."""
        ref = layernorm.weight if layernorm.weight is not None else torch.empty(0)
        return cls(layernorm.normalized_shape, layernorm.eps, layernorm.elementwise_affine,
                   layernorm.bias is not None, spec.output_bits, spec.output_per_channel, dtype=ref.dtype,
                   device="meta")

    @classmethod
    def from_float(cls, layernorm: nn.LayerNorm, spec: QuantSpec) -> QuantLayerNorm:
        """The same LayerNorm (parameters copied) with an output quantizer."""
        ref = layernorm.weight if layernorm.weight is not None else torch.empty(0)
        module = cls(layernorm.normalized_shape, layernorm.eps, layernorm.elementwise_affine,
                     layernorm.bias is not None, spec.output_bits, spec.output_per_channel, dtype=ref.dtype,
                     device=ref.device)
        module.load_state_dict(layernorm.state_dict(), strict=False)
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def set_consumers(self, layers: list[nn.Module]) -> None:
        """The quantized layers that read this output, all of its readers (their `input_source` is `out_quant`):
        where each of them rounds its input onto the grid itself (an integer kernel backend), the output is left
        unrounded for them. Plain references, not child modules."""
        self.__dict__["_consumers"] = tuple(layers)

    def _rounded_by_consumers(self) -> bool:
        consumers = self.__dict__.get("_consumers")
        # Under a compiler the rounding stays here, fused with the LayerNorm (consumers round again: same values).
        return bool(consumers) and not torch.compiler.is_compiling() and all(c.quantizes_input() for c in consumers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if (self.out_quant.observer is None and y.dtype == torch.float32
                and not (torch.is_grad_enabled() and y.requires_grad) and not self.out_quant.learning):
            if self._rounded_by_consumers():  # they turn y into integer codes anyway: no float round trip first
                return y
            return self.out_quant.fake_quantize_(y)  # y is ours and nothing else reads it: no second tensor
        return self.out_quant(y)
