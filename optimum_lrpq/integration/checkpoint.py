"""Checks on an lrpq checkpoint before any tensor is loaded.

transformers only reports a missing tensor (and fills it with uninitialized memory) or an unexpected one. For a
quantized model either means wrong outputs, so an lrpq checkpoint must contain exactly the tensors of the
quantized skeleton, with their shapes, and the integer/float dtypes the quantized layers store. Only the
safetensors headers are read (no pickle is ever loaded).

Errors name each tensor both ways (`naming.TensorNames`): by the transformers 5.x module path that `config.json` and
`optimum-lrpq inspect` use, and by the legacy name it is stored under in the safetensors file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import nn

from ..nn import ActivationQuantizer, PackedWeightLayer
from .naming import TensorNames

# dtypes a quantized checkpoint must use for the tensors the plugin adds (suffix -> safetensors dtype name).
_QUANT_DTYPES = {
    ".qweight": "U8",
    ".weight_scale": "F32",
    ".weight_zero_point": "F32",
    "_quant.scale": "F32",
    "_quant.zero_point": "F32",
}


class CorruptCheckpointError(ValueError):
    pass


def _expected_on_disk(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the skeleton's tensors under the names `save_pretrained` writes (legacy renaming applied)."""
    from transformers.core_model_loading import revert_weight_conversion

    renamed = revert_weight_conversion(model, dict(model.state_dict()))
    return {name: tuple(t.shape) for name, t in renamed.items()}


def _read_headers(checkpoint_files: Sequence[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise CorruptCheckpointError(
                f"lrpq checkpoints are stored as safetensors only; refusing to read {os.path.basename(path)!r} "
                "(pickle-based files can execute code). Re-save the model with `save_pretrained`."
            )
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    view = f.get_slice(key)
                    found[key] = (tuple(view.get_shape()), view.get_dtype())
        except Exception as err:
            raise CorruptCheckpointError(
                f"Cannot read {os.path.basename(path)!r}: {err}. The file is truncated or not a safetensors file; "
                "download or save the checkpoint again."
            ) from err
    return found


def validate_layer_names(model: nn.Module, known: Collection[str], layer_bits: Mapping[str, object]) -> None:
    """Raise `CorruptCheckpointError` if `layer_bits` (config.json) names layers the model does not have.

    config.json names layers by their transformers 5.x module paths; a name copied from the safetensors file (the
    legacy on-disk name) is pointed at the name it should be.
    """
    unknown = sorted(set(layer_bits) - set(known))
    if not unknown:
        return
    names = TensorNames(model)
    described = []
    for name in unknown[:5]:
        loaded = names.loaded(name)
        if loaded != name and loaded in known:
            described.append(f"`{name}` (the name stored on disk for `{loaded}`, which config.json must use)")
        else:
            described.append(f"`{name}`")
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise CorruptCheckpointError(
        f"This lrpq checkpoint's quantization config names layers that {type(model).__name__} does not have: "
        f"{', '.join(described)}{more}. The checkpoint does not match this model class, or its config.json was "
        "edited; re-export it with optimum-lrpq."
    )


def validate_checkpoint(model: nn.Module, checkpoint_files: Sequence[str] | None) -> None:
    """Raise `CorruptCheckpointError` naming the first offending tensors if the files do not fit the skeleton."""
    if not checkpoint_files:
        return
    expected = _expected_on_disk(model)
    found = _read_headers(checkpoint_files)
    names = TensorNames(model)
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"missing tensors {_listing(missing, names.describe_stored)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        problems.append(f"unexpected tensors {_listing(extra, names.describe_stored)}")
    for name in sorted(set(expected) & set(found)):
        shape, (disk_shape, disk_dtype) = expected[name], found[name]
        if shape != disk_shape:
            problems.append(f"tensor {names.describe_stored(name)} has shape {list(disk_shape)}, expected {list(shape)}")
        required = next((d for suffix, d in _QUANT_DTYPES.items() if name.endswith(suffix)), None)
        if required is not None and disk_dtype != required:
            problems.append(f"tensor {names.describe_stored(name)} is {disk_dtype}, expected {required}")
        if len(problems) >= 8:
            break
    if problems:
        raise CorruptCheckpointError(
            "This lrpq checkpoint does not match its quantization config: " + "; ".join(problems) + ". It is "
            "corrupt, was modified, or was written by an incompatible version; re-export it with optimum-lrpq."
        )


def _listing(stored: list[str], describe: Callable[[str], str], limit: int = 5) -> str:
    """The first `limit` tensor names, each described both ways, and how many more there are."""
    shown = ", ".join(describe(name) for name in stored[:limit])
    return shown if len(stored) <= limit else f"{shown} and {len(stored) - limit} more"


def validate_grids(model: nn.Module) -> None:
    """After loading: every stored grid must be one the quantized layers (and their integer kernels) can use.

    Weight zero points must be whole numbers on the code range (integer kernels subtract them from int8 codes) and
    steps positive and finite; activation steps positive and finite, zero points finite and on the code range
    (they may be fractional: the LayerNorm reparameterization produces such). A hand-edited or corrupt value is
    refused with its tensor named, instead of running silently wrong or silently slow.
    """
    problems = []
    names = TensorNames(model)
    for name, module in model.named_modules():
        if isinstance(module, PackedWeightLayer) and module.is_frozen:
            qmax = (1 << module.weight_bits) - 1
            problems += _grid_problems(names, name, "weight_scale", module.weight_scale, None, None)
            problems += _grid_problems(names, name, "weight_zero_point", None, module.weight_zero_point, qmax,
                                       integer=True)
        elif isinstance(module, ActivationQuantizer):
            zero_point = getattr(module, "zero_point", None)
            problems += _grid_problems(names, name, "scale", module.scale, None, None)
            if zero_point is not None:
                problems += _grid_problems(names, name, "zero_point", None, zero_point, (1 << module.bits) - 1)
        if len(problems) >= 5:
            break
    if problems:
        raise CorruptCheckpointError(
            "This lrpq checkpoint holds grids no quantized layer can use: " + "; ".join(problems[:5]) + ". It is "
            "corrupt or was edited by hand; re-export it with optimum-lrpq (quantize the float model again)."
        )


def _grid_problems(names: TensorNames, module: str, field: str, scale, zero_point, qmax: int | None,
                   integer: bool = False) -> list[str]:
    name = names.describe(f"{module}.{field}" if module else field)
    if scale is not None:
        bad = ~torch.isfinite(scale) | (scale <= 0)
        if bool(bad.any()):
            return [(f"{name} has {int(bad.sum())} step(s) that are not positive finite numbers "
                     f"(e.g. {scale[bad].reshape(-1)[0].item():g})")]
    if zero_point is not None:
        bad = ~torch.isfinite(zero_point) | (zero_point < 0) | (zero_point > qmax)
        if integer:
            bad |= zero_point != torch.round(zero_point)
        if bool(bad.any()):
            kind = "whole numbers in" if integer else "in"
            return [(f"{name} has {int(bad.sum())} zero point(s) not {kind} [0, {qmax}] "
                     f"(e.g. {zero_point[bad].reshape(-1)[0].item():g})")]
    return []
