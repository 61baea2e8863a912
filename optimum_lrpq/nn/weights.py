"""Base for layers whose weight is stored as packed integer codes with a per-output-channel grid.

Two states:
- *float* (right after `from_float`, during calibration and reparameterization): a float `weight` Parameter,
  exactly like the layer it replaced;
- *frozen* (after `freeze()`, and what a checkpoint holds): buffers `qweight` (uint8, codes packed along the
  input dim, one row per output channel), `weight_scale` and `weight_zero_point` (float32, one per row).

Only the frozen state is ever saved; the load-time skeleton is built directly in it.

At inference, a kernel backend whose layout holds the codes itself (the integer backends) may take them over: the
`qweight` buffer is then a placeholder of the same shape (one byte of storage), so the layer holds its weight once
(int8), not twice. The codes are rebuilt from the backend's layout whenever they are read: `state_dict()` (saving),
`.to()` and other moves, `load_state_dict`, copies, another backend, `dequantized_weight()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import ActivationGrid, KernelBackend, PackedWeight, get_backend, resolve_backend, return_freed_memory
from ..kernels.reference import dequantize_weight
from ..quantization import packing, uniform
from ..quantization.gptq import gptq_quantize
from ..quantization.ranges import estimate_range
from ..quantization.step_groups import group_steps


class PackedWeightLayer(nn.Module):
    """Shared weight storage and (de)quantization for `QuantLinear` and `QuantConv2d`.

    The arithmetic is a kernel backend's (`optimum_lrpq.kernels`): `kernel_backend` names it (None: reference;
    "auto": the fastest available where the weight is),
    and `prepared_weight` holds the backend's derived layout of the codes (never saved; rebuilt when the codes,
    the device or the backend change).
    """

    weight_bits: int
    weight_shape: tuple[int, ...]
    kernel_backend: str | None = None
    # Frozen weight columns carry the input steps' residuals over this many power-of-two levels (see `QuantLinear`).
    input_step_levels: int | None = None

    def _init_frozen(self, weight_shape: tuple[int, ...], weight_bits: int, device) -> None:
        self.weight_bits = weight_bits
        self.weight_shape = tuple(weight_shape)
        out_channels, row_length = weight_shape[0], math.prod(weight_shape[1:])
        self.register_buffer(
            "qweight",
            torch.zeros(out_channels, packing.packed_length(row_length, weight_bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(out_channels, dtype=torch.float32, device=device))
        self._cache_key = None
        self._cache = None
        self._cache_backend = None
        self._cache_version = None

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (before `freeze()`), or the dequantized one in the layer's float dtype.

        Model code reads e.g. `patch_embeddings.projection.weight.dtype`, so this must always exist.
        """
        if "weight" in self._parameters:
            return self._parameters["weight"]
        if not self.is_frozen:
            raise AttributeError("weight")  # mid-construction: lets nn.Module register the parameter
        bias = self._parameters.get("bias")
        dtype = bias.dtype if bias is not None else torch.float32
        # Model code reads `patch_embeddings.projection.weight.dtype` at every forward: where the kernel layout is
        # the dequantized weight itself (the patch embedding's), hand it out instead of dequantizing again (0.6 ms
        # per DINOv2-S forward). Otherwise computed on access, not kept: only the kernel layout stays in memory.
        if self._cache_key is not None and self.input_step_levels is None:
            backend = self.backend()
            if self._cache_backend is backend and self._cache_key == self._prepared_key(backend, dtype):
                dense = backend.dense_weight(self._cache, dtype)
                if dense is not None and dense._version == self.__dict__.get("_cache_version"):
                    return dense.detach()  # shares the version counter: an in-place edit forces a rebuild
        return self.dequantized_weight(dtype)

    @property
    def is_frozen(self) -> bool:
        return "qweight" in self._buffers

    def freeze(self, range_method: str = "minmax", hessian: torch.Tensor | None = None) -> None:
        """Quantize the float `weight` per output channel, pack it and drop the float copy.

        With `hessian` (E[x xᵀ] of the layer's input, over the flattened weight row), the rounding is GPTQ's
        (`optimum_lrpq.quantization.gptq`) instead of round-to-nearest; the grid is the same.
        """
        rows, scale, zero_point = self.weight_grid(range_method)
        if hessian is not None:
            rows = gptq_quantize(rows, hessian.to(rows.device), scale, zero_point, self.weight_bits)
        self.store(rows, scale, zero_point)

    def weight_grid(self, range_method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float weight rows [out, in·k·k], scale [out], zero_point [out]) before rounding; the rows already
        multiplied by `input_step_factors()` where the layer folds its input steps."""
        rows = self.weight.detach().float().reshape(self.weight.shape[0], -1)
        factors = self.input_step_factors()
        if factors is not None:
            rows = rows * factors.to(rows.device)
        scale, zero_point = estimate_range(rows, self.weight_bits, channel_axis=0, method=range_method)
        return rows, scale.reshape(-1), zero_point.reshape(-1)

    def input_step_factors(self) -> torch.Tensor | None:
        """The per-input-channel factors `freeze()` multiplies into the weight columns, `scale / product_step` of the
        input grid ([in]; where `input_step_levels` is set), or None. A GPTQ Hessian must then be that of x / factors.
        """
        product_step = self.input_product_step()
        if product_step is None:
            return None
        factors = self.input_quant.scale.detach().float() / product_step
        return factors.expand(self.weight_shape[1] if self.is_frozen else self._parameters["weight"].shape[1])

    def input_product_step(self) -> torch.Tensor | None:
        """What each input channel's codes are multiplied by in the product: the power-of-two level of its step
        (`quantization.step_groups.group_steps`); None without `input_step_levels`. Cached per grid, so a kernel
        backend sees the same tensor at every forward."""
        if self.input_step_levels is None:
            return None
        scale = self.input_quant.scale
        cached = self.__dict__.get("_product_step")  # (scale tensor, its version, levels, product step)
        if cached is None or cached[0] is not scale or cached[1:3] != (scale._version, self.input_step_levels):
            with torch.inference_mode(False):  # a tensor with a version counter: backends key their caches on it
                step = group_steps(scale.detach().float(), self.input_step_levels)
            cached = (scale, scale._version, self.input_step_levels, step)
            self.__dict__["_product_step"] = cached
        return cached[3]

    def store(self, rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Round `rows` onto the grid, pack the codes and drop the float weight (the layer becomes frozen)."""
        self.store_codes(uniform.quantize(rows, scale[:, None], zero_point[:, None], self.weight_bits), scale,
                         zero_point)

    def store_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Pack integer `codes` ([out, row], values in [0, 2**bits - 1], any dtype) on the grid (`scale`,
        `zero_point`: [out]) and drop the float weight (the layer becomes frozen)."""
        weight = self.weight.detach()
        del self.weight
        self._init_frozen(tuple(weight.shape), self.weight_bits, weight.device)
        self.qweight.copy_(packing.pack(codes.to(torch.uint8), self.weight_bits))
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)

    @property
    def input_source(self) -> nn.Module | None:
        """The producer's output quantizer whose grid this layer's input already lies on (a `QuantLayerNorm`'s
        `out_quant`), or None. A plain reference, not a child module: the quantizer belongs to the producer."""
        return self.__dict__.get("_input_source")

    def set_input_source(self, quantizer: nn.Module | None) -> None:
        self.__dict__["_input_source"] = quantizer  # bypasses nn.Module registration (no duplicate state)

    def packed_weight(self) -> PackedWeight:
        """The stored weight (frozen layers only), as the kernel backends take it."""
        return PackedWeight(self.codes(), self.weight_bits, self.weight_shape, self.weight_scale,
                            self.weight_zero_point)

    def codes(self) -> torch.Tensor:
        """The packed weight codes (uint8 [out, packed row]), rebuilt from the kernel layout if it holds them."""
        if self.codes_released:
            return self._cache_backend.restore_codes(self._cache)
        return self.qweight

    @property
    def codes_released(self) -> bool:
        """Whether the kernel backend's layout holds the codes and `qweight` is a placeholder (see module doc)."""
        placeholder = self.__dict__.get("_codes_placeholder")
        return placeholder is not None and self._buffers.get("qweight") is placeholder

    def _take_back_codes(self) -> None:
        """Put the real codes back into `qweight` (before the prepared layout is dropped, moved or replaced)."""
        group = self.__dict__.get("_input_group")
        if group is not None:
            group.forget()  # its layout holds this layer's weight
        if self.codes_released:
            with torch.inference_mode(False):  # a normal buffer (with a version counter) even under inference_mode
                self._buffers["qweight"] = self.codes().clone()
        self.__dict__["_codes_placeholder"] = None
        self._cache_key = None

    def _release_codes(self, backend: KernelBackend, dtype: torch.dtype) -> None:
        if not self.codes_released and backend.release_codes(self._cache):
            codes = self._buffers["qweight"]
            with torch.inference_mode(False):
                placeholder = torch.zeros(1, dtype=codes.dtype, device=codes.device).expand(codes.shape)
            self.__dict__["_codes_placeholder"] = self._buffers["qweight"] = placeholder
            self._cache_key = self._prepared_key(backend, dtype)  # keyed on the placeholder from now on

    def backend(self) -> KernelBackend:
        """The backend that computes this layer where its weight is (resolves "auto" and unavailable backends)."""
        return resolve_backend(self.kernel_backend, self._buffers["qweight"].device)

    def prepared_weight(self, backend: KernelBackend, dtype: torch.dtype):
        """`backend`'s layout of the frozen weight for `dtype` (cached; rebuilt when the stored codes change)."""
        key = self._prepared_key(backend, dtype)
        cache = self._cache
        if key != self._cache_key or (type(cache) is torch.Tensor
                                         and cache._version != self.__dict__.get("_cache_version")):
            self._take_back_codes()
            # a normal tensor even when first built under inference_mode: a later forward with autograd reads it
            with torch.inference_mode(False):
                self._cache = backend.prepare_weight(self.packed_weight(), dtype)
            self._cache_backend = backend
            # a float layout may be handed out as `weight`: an in-place edit of it (version) rebuilds it
            self._cache_version = self._cache._version if type(self._cache) is torch.Tensor else None
            self._cache_key = self._prepared_key(backend, dtype)
            self._release_codes(backend, dtype)  # hold the weight once where the backend's layout can
        return self._cache

    def _prepared_key(self, backend: KernelBackend, dtype: torch.dtype) -> tuple:
        buffers = self._buffers  # read directly: this runs at every forward, nn.Module.__getattr__ is slow
        codes = buffers["qweight"]
        return (backend.name, codes.data_ptr(), codes._version, buffers["weight_scale"]._version,
                buffers["weight_zero_point"]._version, codes.device, dtype)

    # Runs eagerly under torch.compile: the backend's cached layout is keyed on the stored tensors, and integer
    # kernels take opaque prepacked weights that cannot be traced; the rest of the model (LayerNorm, GELU, attention,
    # activation quantizers) still compiles, without one recompilation per layer.
    @torch.compiler.disable
    def compute(self, x: torch.Tensor, input_quant: nn.Module | None, op: str, *args) -> torch.Tensor:
        """The layer's product through its kernel backend: `op` ("linear" or "conv2d") of `x` on `input_quant`'s
        grid (None: `x` is already quantized upstream or stays as is) with the weight, `args` after the bias.

        Before `freeze()` (calibration) the float weight is used with the reference backend; an input quantizer
        that is observing (calibration) records `x` and leaves it float.
        """
        if input_quant is not None and input_quant.observer is not None:
            x = input_quant(x)
        grid = self.input_grid(input_quant)
        if not self.is_frozen:
            backend, weight = get_backend("reference"), self._parameters["weight"].to(x.dtype)
        else:
            backend = self.backend()
            weight = self.prepared_weight(backend, x.dtype)
        return getattr(backend, op)(x, weight, self.bias, grid, *args)

    def input_grid(self, input_quant: nn.Module | None) -> ActivationGrid | None:
        """The grid the layer's input is on, as the kernels take it: `input_quant`'s (None while it observes), or
        the producer's when the input was quantized upstream (`applied`), or None."""
        if input_quant is not None:
            if input_quant.observer is not None:
                return None
            # the float weight (before `freeze()`) does not carry any step yet
            return input_quant.grid(product_step=self.input_product_step() if self.is_frozen else None)
        source = self.input_source
        if source is not None and source.observer is None:
            # The producer's grid (kernels may need it); the input lies on it unless the producer left the rounding
            # to consumers that quantize their inputs themselves (`QuantLayerNorm`).
            return source.grid(applied=not self.quantizes_input(), shared=True)
        return None

    def quantizes_input(self) -> bool:
        """Whether this layer's product rounds its input onto the grid itself (a frozen weight on a backend that
        `quantizes_inputs`), so that a producer quantizing its output for it (`input_source`) may leave that out."""
        return self.is_frozen and self.backend().quantizes_inputs

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the layer stands for (the float weight itself before `freeze()`)."""
        if not self.is_frozen:
            return self._parameters["weight"].to(dtype)
        weight = dequantize_weight(self.packed_weight(), torch.float32)
        factors = self.input_step_factors()
        if factors is not None:
            weight = weight / factors.to(weight.device)
        return weight.to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._take_back_codes()  # a real buffer to load into; new codes: never serve a stale prepared weight
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_released:  # the checkpoint gets the real codes, never the placeholder
            destination[prefix + "qweight"] = self.codes()

    def _apply(self, fn, recurse=True):
        self._take_back_codes()  # move the codes, not the placeholder
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # copy.deepcopy and pickle: the real codes, without the backend's layout (rebuilt at the next forward)
        state = dict(super().__getstate__())
        if self.codes_released:
            state["_buffers"] = {**state["_buffers"], "qweight": self.codes()}
        state.update(_codes_placeholder=None, _cache=None, _cache_key=None, _cache_backend=None, _cache_version=None)
        return state


def prepare_kernels(model: nn.Module) -> int:
    """Build, now, the kernel layouts of every frozen weight layer whose backend asks for it (`prepare_at_load`),
    instead of on the first forward, then give the memory that preparation freed back to the system.

    Called when a quantized model is loaded or made, so that its resident memory is the int8 layouts (the stored
    codes are released to them) and not the temporaries of widening them. Layers on other backends, or not in
    memory (meta / offloaded), are left to the first forward. Returns how many layers were prepared."""
    count = 0
    groups = {}
    for module in model.modules():
        if not isinstance(module, PackedWeightLayer) or not module.is_frozen or module.qweight.is_meta:
            continue
        backend = module.backend()
        if backend.prepare_at_load:
            dtype = module.bias.dtype if module.bias is not None else torch.float32
            with torch.inference_mode(False), torch.no_grad():
                prepared = module.prepared_weight(backend, dtype)
                grid = module.input_grid(getattr(module, "input_quant", None))
                if grid is not None:
                    backend.prepare_constants(prepared, grid, module.bias)
            count += 1
            group = module.__dict__.get("_input_group")
            if group is not None:
                groups[id(group)] = (group, dtype)
    for group, dtype in groups.values():  # once its members are prepared: their weights stacked (q, k, v)
        with torch.inference_mode(False), torch.no_grad():
            group.prepare(dtype)
    if count:
        return_freed_memory()
    return count
