"""Float module class -> its quantized twin, the way optimum-quanto's `register_qmodule` pairs them.

A quantized module class registers the float class it replaces and implements two class methods taking the float
module and a `QuantSpec`: `from_float` (in-memory quantization: float weights kept until `freeze()`) and
`skeleton` (the empty load-time module on the meta device, in the frozen layout). Module conversion
(`optimum_lrpq.pipeline.conversion`) only goes through `quantize_module`, so a new module kind is one class here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..kernels import check_backend_name

_QMODULES: dict[type[nn.Module], type[nn.Module]] = {}


@dataclass(frozen=True)
class QuantSpec:
    """How one module is quantized.

    weight_bits: bits of the weight (weight layers). input_bits: bits of the layer's own input quantizer (None:
    its input is quantized by its producer). input_per_channel: one input step per channel. input_step_levels:
    the input steps are split into G power-of-two levels and residuals folded into the weight columns
    (`LRPQConfig.input_step_levels`; None: no fold). force_bias: add a zero
    bias if the float layer has none (the LayerNorm reparameterization writes one). output_bits /
    output_per_channel: the output quantizer of a LayerNorm.
    """

    weight_bits: int | None = None
    input_bits: int | None = None
    input_per_channel: bool = False
    input_step_levels: int | None = None
    force_bias: bool = False
    output_bits: int | None = None
    output_per_channel: bool = False


def register_qmodule(float_class: type[nn.Module]):
    """Class decorator: the decorated quantized class replaces `float_class` instances."""

    def register(quantized_class: type[nn.Module]) -> type[nn.Module]:
        _QMODULES[float_class] = quantized_class
        return quantized_class

    return register


def quantized_class_for(module: nn.Module) -> type[nn.Module]:
    """The quantized twin of `module`'s class (exact class first, then its bases), or a TypeError."""
    for cls in type(module).__mro__:
        if cls in _QMODULES:
            return _QMODULES[cls]
    raise TypeError(f"No quantized module for {type(module).__name__}; quantizable: "
                    f"{sorted(c.__name__ for c in _QMODULES)}.")


def quantize_module(module: nn.Module, spec: QuantSpec, *, skeleton: bool) -> nn.Module:
    """The quantized twin of `module`: a meta-device skeleton to load into, or wrapping the float module's weights."""
    cls = quantized_class_for(module)
    return cls.skeleton(module, spec) if skeleton else cls.from_float(module, spec)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether `module` is one of the registered quantized modules."""
    return isinstance(module, tuple(_QMODULES.values()))


def set_kernel_backend(model: nn.Module, name: str | None) -> int:
    """Compute every quantized weight layer of `model` with the kernel backend `name`: "auto" (the fastest one
    available where each layer's weight is), a registered backend ("reference", "onednn", ...), or None (reference).

    Returns how many layers were switched. The backend's derived weight layouts are built on the next forward; a
    backend that cannot run where a layer is (another device) falls back to the reference backend.
    """
    check_backend_name(name)  # an unknown name fails here, naming the registered backends
    count = 0
    for module in model.modules():
        if is_quantized_module(module) and hasattr(module, "kernel_backend"):
            module.kernel_backend = name
            count += 1
    return count
