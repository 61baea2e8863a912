"""Activation quantizer modules: fake quantization of a tensor on a stored grid.

During calibration an `observer` is attached (see `optimum_lrpq.pipeline.observers`): the module then records what
passes through and returns it unchanged. Once calibrated, the grid lives in buffers (`scale`,
`zero_point`), which are what `save_pretrained` writes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..kernels import ActivationGrid
from ..quantization import logarithmic, uniform

logger = logging.get_logger(__name__)


class ActivationQuantizer(nn.Module):
    """Base of the activation quantizers: a grid in buffers, and an optional calibration `observer`.

    While an observer is attached the module records what passes through and returns it unchanged; `set_grid_from`
    then turns the observer's statistics into this quantizer's grid, so calibration needs no per-class switch.
    """

    bits: int
    observer = None

    @property
    def per_channel(self) -> bool:
        return False

    @property
    def learning(self) -> bool:
        """Whether a grid tensor requires grad (block reconstruction learns the steps): the in-place inference paths
        must then step aside, autograd needs the graph."""
        return torch.is_grad_enabled() and any(b.requires_grad for b in self.buffers(recurse=False))

    def set_grid_from(self, observer, *, min_rows: int) -> None:
        """Take the grid from a finished observer (`optimum_lrpq.pipeline.observers.ActivationObserver`)."""
        raise NotImplementedError

    def fake_quantize_(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` in place on a float32 tensor the caller owns and autograd does not need (inference with no
        observer attached): the same values without a second tensor of x's size."""
        raise NotImplementedError


class UniformQuantizer(ActivationQuantizer):
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

    def set_grid_from(self, observer, *, min_rows: int) -> None:
        """The observed range's grid; a per-channel quantizer whose observer saw fewer than `min_rows` tokens gets
        one shared range (the observer decides)."""
        if not observer.per_channel and bool((observer.high - observer.low).abs().max() == 0):
            logger.warning(
                f"{observer.name} saw a constant input ({observer.low.item():g}) during calibration, so its grid "
                "only represents that value. Calibrate on more varied images if this layer matters."
            )
        self.set_grid(*observer.uniform_grid(self.bits, min_rows=min_rows))

    def grid(self, applied: bool = False, product_step: torch.Tensor | None = None,
             shared: bool = False) -> ActivationGrid:
        """The grid, as kernel backends take it (`applied`: the input already lies on it; `product_step`: the
        factor the codes take in the consumer's product where its weight columns carry the rest of the steps;
        `shared`: several layers read the input, see `ActivationGrid`).

        The last one made is given again while it holds the same tensors (a layer asks at every forward); in-place
        edits of them are seen through the tensors themselves."""
        scale, zero_point = self._buffers["scale"], self._buffers["zero_point"]
        grid = self.__dict__.get("_last_grid")
        if (grid is None or grid.scale is not scale or grid.zero_point is not zero_point or grid.bits != self.bits
                or grid.applied != applied or grid.product_step is not product_step or grid.shared != shared):
            grid = self.__dict__["_last_grid"] = ActivationGrid(scale, zero_point, self.bits, applied, product_step,
                                                                shared)
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        return uniform.fake_quantize(x, self.scale, self.zero_point, self.bits)

    def fake_quantize_(self, x: torch.Tensor) -> torch.Tensor:
        return uniform.fake_quantize_(x, self.scale, self.zero_point, self.bits)

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
        if self.observer is not None:  # observers take the channel (head) on the last dim
            return super().forward(x.transpose(1, -1)).transpose(1, -1)
        # the grid broadcast over dim 1 instead of transposing x: same values, contiguous passes
        view = self._head_view(x)
        return uniform.fake_quantize(x, self.scale.view(view), self.zero_point.view(view), self.bits)

    def fake_quantize_(self, x: torch.Tensor) -> torch.Tensor:
        view = self._head_view(x)
        return uniform.fake_quantize_(x, self.scale.view(view), self.zero_point.view(view), self.bits)

    @staticmethod
    def _head_view(x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)


class LogQuantizer(ActivationQuantizer):
    """Log-family quantizer for post-softmax probabilities (values in [0, 1]): log√2 or log2 levels below `scale`."""

    def __init__(self, bits: int, sqrt2: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.bits = bits
        self.sqrt2 = sqrt2
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.observer = None

    def set_grid(self, scale: torch.Tensor) -> None:
        self.scale = scale.detach().reshape(-1).float().to(self.scale.device)

    def set_grid_from(self, observer, *, min_rows: int) -> None:
        self.set_grid(observer.log_scale(self.bits, self.sqrt2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        return logarithmic.log_fake_quantize(x, self.scale, self.bits, sqrt2=self.sqrt2)

    def fake_quantize_(self, x: torch.Tensor) -> torch.Tensor:
        return logarithmic.log_fake_quantize_(x, self.scale, self.bits, sqrt2=self.sqrt2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'log_sqrt2' if self.sqrt2 else 'log2'}"
