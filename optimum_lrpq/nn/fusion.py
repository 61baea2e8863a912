"""Activations moved into the linear layer that produces their input.

An MLP computes ``fc2(act(fc1(x)))``. Applied by fc1 itself (`QuantLinear.activation`), the activation costs no
tensor of its own (fc1's output is 77 MB at batch 32 on ViT-Base) and an integer backend can fuse it into the GEMM
(oneDNN's GELU post-op). The MLP keeps a placeholder where the activation was, so its forward is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import GELUActivation


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
