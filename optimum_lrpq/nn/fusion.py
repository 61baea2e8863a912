"""Work of several modules done by one, with the model's forward unchanged.

- Activations moved into the linear layer that produces their input. An MLP computes ``fc2(act(fc1(x)))``. Applied
  by fc1 itself (`QuantLinear.activation`), the activation costs no tensor of its own (fc1's output is 77 MB at
  batch 32 on ViT-Base) and an integer backend can fuse it into the GEMM (oneDNN's GELU post-op). The MLP keeps a
  placeholder where the activation was.
- Linear layers that read the same input (q, k and v) computed as one product (`SharedInputGroup`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.activations import GELUActivation

from ..kernels.integer import tensor_version


def movable_activation(module: nn.Module) -> str | None:
    """The name (one of `kernels.ACTIVATIONS`) of the exact function `module` computes, if a linear layer can take it
    over: transformers' `GELUActivation` on `torch.nn.functional.gelu`, or `nn.GELU()` (erf form). None otherwise
    (tanh approximation, Python GELU, other activations or subclasses): such a module stays where it is."""
    if type(module) is GELUActivation and module.act is nn.functional.gelu:
        return "gelu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


class ActivationInProducer(nn.Module):
    """Stands where an activation was: the layer `producer` already applied `activation` to this input."""

    def __init__(self, activation: str, producer: str):
        super().__init__()
        self.activation, self.producer = activation, producer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.activation} applied by {self.producer}"


class SharedInputGroup:
    """Quantized linear layers that always read the same tensor (q, k and v, fed by one LayerNorm), computed together
    where the kernel backend can (`KernelBackend.prepare_group` / `linear_group`: the oneDNN backend stacks the three
    weights into one matrix, one GEMM instead of three).

    The first member called on an input computes every member's output and keeps the others' until each is asked for
    with that same tensor (same object, storage, shape and version counter). Any other call (another input, a member
    not frozen, a backend without grouped products, autograd) is computed by the layer alone, exactly as without a
    group. Not saved: the conversion groups the layers again when a checkpoint is loaded.
    """

    def __init__(self, members: list[nn.Module]):
        if len(members) < 2:
            raise ValueError("A shared-input group needs at least two layers.")
        self.members = tuple(members)
        self._layout_key: tuple | None = None
        self._layout = None
        self._backend = None
        self._forget_outputs()

    def _forget_outputs(self) -> None:
        self._pending: dict[int, torch.Tensor] = {}
        self._input_ref = None
        self._input_key: tuple | None = None

    @staticmethod
    def _key_of(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), tensor_version(x))

    def forget(self) -> None:
        """Drop the grouped layout and any kept outputs (a member's weight is being moved or replaced)."""
        self._layout_key = self._layout = self._backend = None
        self._forget_outputs()

    @torch.compiler.disable
    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`member(x)` through the grouped product, or None where the member must compute it alone."""
        if self._pending and self._input_ref() is x and self._input_key == self._key_of(x):
            y = self._pending.pop(id(member), None)
            if y is not None:
                return y
        layout = self._grouped_layout(x)
        if layout is None:
            return None
        first = self.members[0]
        outputs = self._backend.linear_group(x, layout, [m.bias for m in self.members], first.input_grid(None))
        if outputs is None:
            return None
        self._pending = {id(m): y for m, y in zip(self.members, outputs, strict=True) if m is not member}
        self._input_ref, self._input_key = weakref.ref(x), self._key_of(x)
        return outputs[self.members.index(member)]

    def _grouped_layout(self, x: torch.Tensor):
        """The backend's grouped layout of the members' current layouts for input `x` (rebuilt when one of them is),
        or None."""
        first = self.members[0]
        if not first.is_frozen:
            return None
        backend = first.backend()
        if not backend.groups_layers:
            return None
        prepared = []
        for member in self.members:
            if (not member.is_frozen or member.input_quant is not None or member.activation is not None
                    or member.input_source is not first.input_source or member.backend() is not backend):
                return None
            # every member's tensors where x is (an offloaded model loads each layer's own at its own call only)
            if any(t is not None and t.device != x.device for t in (member._buffers["qweight"], member.bias)):
                return None
            prepared.append(member.prepared_weight(backend, x.dtype))
        key = self._layout_key
        if key is None or key[0] is not backend or any(ref() is not p for ref, p in zip(key[1:], prepared)):
            self._layout = backend.prepare_group(prepared)
            self._backend = backend
            self._layout_key = (backend, *(weakref.ref(p) for p in prepared))
            self._forget_outputs()
        return self._layout

    def prepare(self, dtype: torch.dtype) -> bool:
        """Build the grouped layout now (at load) for inputs of `dtype` on the members' device; whether there is one."""
        device = self.members[0]._buffers["qweight"].device
        return self._grouped_layout(torch.empty(0, dtype=dtype, device=device)) is not None

    def __getstate__(self):
        # copies (deepcopy, pickle) rebuild the layout from their own members' layouts at their first forward
        state = dict(self.__dict__)
        state.update(_layout_key=None, _layout=None, _backend=None, _pending={}, _input_ref=None, _input_key=None)
        return state


def group_shared_input(layers: list[nn.Module]) -> SharedInputGroup | None:
    """Group quantized linear layers that always read the same tensor (the consumers of one producer's quantized
    output); None for fewer than two layers."""
    if len(layers) < 2:
        return None
    group = SharedInputGroup(layers)
    for layer in layers:
        layer.__dict__["_input_group"] = group  # not a submodule: nothing to save, no duplicate state
    return group
