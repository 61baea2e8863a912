"""The kernel interface: how a quantized layer's product is computed, behind one small set of operations.

`nn/` modules hold the canonical state (packed weight codes and grids, exactly what a checkpoint stores) and call a
`KernelBackend` for the arithmetic, the way optimum-quanto's `library/` ops sit under its `nn/` modules. A backend
turns the canonical weight into its own derived layout once (`prepare_weight`: a dequantized float copy, widened
int8 codes, a prepacked GEMM operand, row sums...; never saved, rebuilt after loading or moving the model) and
computes `linear` / `conv2d` from it. Adding a backend is one file here: subclass `KernelBackend`, implement the
four abstract methods (and `release_codes` / `restore_codes` if the layout can stand in for the stored codes), call
`register_backend`; `nn/` does not change.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class PackedWeight:
    """A weight as stored: `codes` (uint8, one row per output channel, `bits`-bit codes packed along the row),
    per-row `scale` and `zero_point` (float32), and the float weight's `shape` ([out, in] or [out, in/g, kh, kw])."""

    codes: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    scale: torch.Tensor
    zero_point: torch.Tensor


@dataclass(frozen=True)
class ActivationGrid:
    """The uniform grid a layer input is quantized on: `x_int = clamp(round(x / scale + zero_point), 0, 2**bits-1)`.

    `scale` / `zero_point` have one element (per tensor) or one per input channel (last dim); the zero point may be
    fractional (LayerNorm reparameterization). `applied=True` means the input already lies on this grid (it was
    quantized by its producer, e.g. a `QuantLayerNorm`), so a float backend must not round it again.
    `product_step` (None: `scale`) is the factor each channel's codes take in the product, `(x_int - zero_point) *
    product_step`, where the weight columns carry the rest of the step, `scale / product_step`
    (`LRPQConfig.input_step_levels`): an integer GEMM factors out one product step per group of channels.
    `shared=True`: the grid of a producer's output that several layers read (q, k and v), so a backend may compute
    the codes of one input once for all of them.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    applied: bool = False
    product_step: torch.Tensor | None = None
    shared: bool = False


# Activations a linear layer can apply to its own output (`KernelBackend.linear(..., activation=)`): an MLP's GELU
# moved into the fc1 that feeds it, so no second tensor of fc1's output size is made and a backend can fuse it.
ACTIVATIONS = ("gelu",)


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """`activation` of a linear layer's fresh output `y`: in place unless autograd needs `y` (GELU's backward reads
    its input)."""
    if activation is None:
        return y
    if activation != "gelu":
        raise ValueError(f"Unknown activation {activation!r}; kernel backends apply {ACTIVATIONS}.")
    if torch.is_grad_enabled() and y.requires_grad:
        return torch.nn.functional.gelu(y)
    return torch.ops.aten.gelu_(y)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, ...] | int
    padding: tuple[int, ...] | int | str
    dilation: tuple[int, ...] | int
    groups: int


class KernelBackend(abc.ABC):
    """One way of computing quantized layers. Stateless: per-layer state is what `prepare_weight` returns."""

    name: ClassVar[str]
    # "auto" picks the available backend with the highest priority.
    priority: ClassVar[int] = 0
    # What `is_available` asks of the device, for the message when a requested backend cannot run.
    requirements: ClassVar[str] = "nothing"
    # Whether loading a model builds this backend's layouts right away (`nn.prepare_kernels`) instead of on the
    # first forward: worth it where the layout replaces the stored codes (less memory, faster first forward).
    prepare_at_load: ClassVar[bool] = False
    # Whether `prepare_group` / `linear_group` compute layers that read the same input together.
    groups_layers: ClassVar[bool] = False
    # Whether `linear` turns its input into codes on the grid itself, even where the producer could have put it on
    # the grid (`ActivationGrid.applied`): the producer (a quantized LayerNorm) then need not round it first.
    quantizes_inputs: ClassVar[bool] = False

    @abc.abstractmethod
    def is_available(self, device: torch.device) -> bool:
        """Whether this backend can run on `device` (and on this CPU's instruction set)."""

    @abc.abstractmethod
    def prepare_weight(self, weight: PackedWeight, dtype: torch.dtype) -> Any:
        """The backend's derived layout of `weight` for computing in `dtype` (held in memory, never saved)."""

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None,
               input_grid: ActivationGrid | None, activation: str | None = None) -> torch.Tensor:
        """`x` (float, [..., in]) quantized on `input_grid` (None: used as is) times the prepared weight, plus bias,
        then `activation` (one of `ACTIVATIONS`, or None) applied to the result."""

    def prepare_constants(self, prepared: Any, grid: ActivationGrid, bias: torch.Tensor | None) -> None:
        """Compute, ahead of the first forward, what `linear` derives from the input grid and the bias (cached by the
        backend; `prepare_at_load`). The default: nothing to compute."""

    def prepare_group(self, prepared: list[Any]) -> Any | None:
        """One layout for layers that always read the same input (q, k and v), from their own layouts, so that
        `linear_group` computes them as one product; it may take over their weights (the layers then hold them once).
        None (the default): each layer computes its own product."""
        return None

    def linear_group(self, x: torch.Tensor, group: Any, biases: list[torch.Tensor | None],
                     input_grid: ActivationGrid | None) -> list[torch.Tensor] | None:
        """What `linear` gives for each layer of `group` (a `prepare_group` layout) on the same input `x`, in order;
        None where this input cannot take the grouped product (each layer then computes its own)."""
        return None

    def dense_weight(self, prepared: Any, dtype: torch.dtype) -> torch.Tensor | None:
        """The float weight in `dtype` if `prepared` already holds it (the reference layout: the dequantized weight
        itself), so that reading a layer's `weight` costs nothing; None (the default) where it would have to be
        computed. The caller must not modify it in place (layers check its version counter at every forward)."""
        if isinstance(prepared, torch.Tensor) and prepared.dtype == dtype:
            return prepared
        return None

    def release_codes(self, prepared: Any) -> bool:
        """Make `prepared` independent of the stored codes it was made from, so that the layer can drop its copy;
        they are rebuilt with `restore_codes` when needed (saving, moving, another backend). False (the default):
        this layout cannot give them back, and the layer keeps them."""
        return False

    def restore_codes(self, prepared: Any) -> torch.Tensor:
        """The packed codes (uint8, as stored) that `prepared` was made from, rebuilt from it; only called after
        `release_codes(prepared)` returned True."""
        raise NotImplementedError(f"the {self.name!r} backend does not release weight codes")

    @abc.abstractmethod
    def conv2d(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None, input_grid: ActivationGrid | None,
               geometry: ConvGeometry) -> torch.Tensor:
        """The same for a 2-d convolution (the patch embedding)."""


_BACKENDS: dict[str, KernelBackend] = {}
_DEFAULT = "reference"
AUTO = "auto"
_LOGGED: set[tuple[str, str, str]] = set()
_RESOLVED: dict[tuple[str | None, torch.device], KernelBackend] = {}


def register_backend(backend: KernelBackend) -> KernelBackend:
    """Make `backend` selectable by its `name` (re-registering a name replaces it)."""
    _BACKENDS[backend.name] = backend
    _RESOLVED.clear()  # "auto" may now pick it
    return backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str | None = None) -> KernelBackend:
    """The backend called `name` (None: the reference backend), or a ValueError naming the registered ones."""
    name = name or _DEFAULT
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"Unknown kernel backend {name!r}; choose 'auto' or one of {available_backends()}.") from None


def check_backend_name(name: str | None) -> str | None:
    """`name` if it is None, "auto" or a registered backend; ValueError otherwise."""
    if name is not None and name != AUTO:
        get_backend(name)
    return name


def resolve_backend(name: str | None, device: torch.device) -> KernelBackend:
    """The backend that computes on `device` when `name` is asked for.

    None: the reference backend. "auto": the available backend with the highest priority (an integer backend where
    the CPU or GPU has integer units). A named backend that cannot run on `device` (another CPU, a GPU) falls back to
    the reference backend; the choice is logged once per (request, device). Called by every quantized layer at every
    forward, so the answer is cached (the cache is emptied when a backend is registered).
    """
    key = (name, device)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = _resolve(name, device)
    return chosen


def _resolve(name: str | None, device: torch.device) -> KernelBackend:
    if name is None:
        return _BACKENDS[_DEFAULT]
    if name == AUTO:
        candidates = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
        chosen = next(b for b in candidates if b.name == _DEFAULT or b.is_available(device))
    else:
        requested = get_backend(name)
        chosen = requested if requested.is_available(device) else _BACKENDS[_DEFAULT]
    logged = (name, chosen.name, str(device))
    if logged not in _LOGGED:
        _LOGGED.add(logged)
        message = f"optimum-lrpq computes quantized layers on {device} with the {chosen.name!r} kernel backend"
        if chosen.name == name or name == AUTO:
            logger.info(message + ".")
        else:  # asked for by name and not possible here: say so (once), the model still runs
            logger.warning(f"{message}: {name!r} is not available on {device} (it needs "
                           f"{requested.requirements}).")
    return chosen
