"""Models placed by accelerate (`from_pretrained(..., device_map=...)`, `dispatch_model`, `cpu_offload`).

Quantization rewrites every weight (reparameterization, packing), so weights that accelerate keeps offloaded (on
the meta device, loaded from CPU RAM or disk only for each forward) must be in memory while it runs. `onload`
loads them onto the device their module executes on and keeps accelerate's device-alignment hooks without
offloading; `conversion` carries each replaced module's hook over to its quantized replacement. Models split over
several devices keep working that way (inputs are still moved between devices by the hooks); the quantized model is
roughly `bits / 32` of the float size, so it usually fits where the float model had to be offloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float dtype `model` computes (its first floating-point parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _align_hooks(hook) -> list:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    if isinstance(hook, SequentialHook):
        return [h for inner in hook.hooks for h in _align_hooks(inner)]
    return [hook] if isinstance(hook, AlignDevicesHook) else []


def onload(model: nn.Module) -> int:
    """Load every accelerate-offloaded weight of `model` into memory for good; return the bytes loaded.

    A no-op (returning 0) for models without offloaded modules.
    """
    offloaded = [(name, module) for name, module in model.named_modules()
                 if any(h.offload for h in _align_hooks(getattr(module, "_hf_hook", None)))]
    if not offloaded:
        return 0
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    loaded = 0
    devices = {}
    for name, module in offloaded:
        (hook,) = [h for h in _align_hooks(module._hf_hook) if h.offload]
        device = hook.execution_device if hook.execution_device is not None else "cpu"
        for tensor_name, tensor in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                        recurse=hook.place_submodules):
            if tensor.device.type == "meta":
                # A copy: offloaded values may be read-only memory maps of the offload folder.
                value = hook.weights_map[tensor_name].to(device, copy=True)
                set_module_tensor_to_device(module, tensor_name, device, value=value)
                loaded += value.numel() * value.element_size()
        # Same execution device and output placement, without moving the weights away after each forward.
        replacement = AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device,
                                       place_submodules=hook.place_submodules)
        remove_hook_from_module(module)
        add_hook_to_module(module, replacement)
        devices[name] = torch.device(device)
    _update_device_map(model, devices)
    logger.warning(
        f"{len(offloaded)} modules of {type(model).__name__} had offloaded weights (device_map with 'cpu' or 'disk' "
        f"entries); {loaded / 2**20:.2f} MiB were loaded onto their execution devices for quantization and stay "
        "there. Quantization needs the float weights in memory; the quantized model is about bits/32 of that size."
    )
    return loaded


def _update_device_map(model: nn.Module, devices: dict[str, torch.device]) -> None:
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return
    for key, value in list(device_map.items()):
        if value in ("cpu", "disk"):
            inside = (d for n, d in devices.items() if not key or n == key or n.startswith(f"{key}."))
            device = next(inside, None)
            if device is not None:
                device_map[key] = device.index if device.type == "cuda" else device.type
    if all(value == "cpu" for value in device_map.values()):
        # A model wholly in CPU memory is not offloaded; transformers would otherwise save it as if it were.
        del model.hf_device_map


def carry_hook(original: nn.Module, replacement: nn.Module) -> None:
    """Give `replacement` the accelerate hook of the module it replaces (device alignment of its inputs)."""
    hook = getattr(original, "_hf_hook", None)
    if hook is None:
        return
    if any(h.offload for h in _align_hooks(hook)):
        raise ValueError("Cannot replace a module whose weights are still offloaded; call placement.onload first.")
    from accelerate.hooks import add_hook_to_module

    add_hook_to_module(replacement, hook)
