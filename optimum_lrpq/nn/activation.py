"""Activation quantizer modules: fake quantization of a tensor on a stored grid.

During calibration an `observer` is attached (see `optimum_lrpq.observers`): the module then records what
passes through and returns it unchanged. Once calibrated, the grid lives in buffers (`scale`,
`zero_point`), which are what `save_pretrained` writes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization import logarithmic, uniform


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantizer, per tensor (`channels=None`) or per channel along the last dim."""

    def __init__(self, bits: int, channels: int | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.bits = bits
        size = 1 if channels is None else channels
        self.register_buffer("scale", torch.ones(size, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(size, dtype=torch.float32, device=device))
        self.observer = None

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() > 1

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Replace the grid; the buffers take the new shape (per tensor = one element)."""
        self.scale = scale.detach().reshape(-1).float().to(self.scale.device)
        self.zero_point = zero_point.detach().reshape(-1).float().to(self.zero_point.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        return uniform.fake_quantize(x, self.scale, self.zero_point, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'per_channel' if self.per_channel else 'per_tensor'}"


class PerHeadQuantizer(UniformQuantizer):
    """One uniform grid per attention head for the operands q, k, v ([batch, heads, tokens, head_dim]).

    Each head's q·kᵀ and probabilities·v is its own matmul, so one scale per head still factors out of the integer
    product; it keeps a head with outlier channels from coarsening every other head's grid.
    """

    def __init__(self, bits: int, heads: int, device: torch.device | str | None = None):
        super().__init__(bits, channels=heads, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, -1)).transpose(1, -1)


class LogQuantizer(nn.Module):
    """Log-family quantizer for post-softmax probabilities (values in [0, 1]): log√2 or log2 levels below `scale`."""

    def __init__(self, bits: int, sqrt2: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.bits = bits
        self.sqrt2 = sqrt2
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.observer = None

    def set_grid(self, scale: torch.Tensor) -> None:
        self.scale = scale.detach().reshape(-1).float().to(self.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        return logarithmic.log_fake_quantize(x, self.scale, self.bits, sqrt2=self.sqrt2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'log_sqrt2' if self.sqrt2 else 'log2'}"
