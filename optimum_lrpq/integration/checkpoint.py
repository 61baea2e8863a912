"""Checks on an lrpq checkpoint before any tensor is loaded.

transformers only reports a missing tensor (and fills it with uninitialized memory) or an unexpected one. For a
quantized model either means wrong outputs, so an lrpq checkpoint must contain exactly the tensors of the
quantized skeleton, with their shapes, and the integer/float dtypes the quantized layers store. Only the
safetensors headers are read (no pickle is ever loaded).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from safetensors import safe_open
from torch import nn

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


def validate_checkpoint(model: nn.Module, checkpoint_files: Sequence[str] | None) -> None:
    """Raise `CorruptCheckpointError` naming the first offending tensors if the files do not fit the skeleton."""
    if not checkpoint_files:
        return
    expected = _expected_on_disk(model)
    found = _read_headers(checkpoint_files)
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    extra = sorted(set(found) - set(expected))
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}")
    for name in sorted(set(expected) & set(found)):
        shape, (disk_shape, disk_dtype) = expected[name], found[name]
        if shape != disk_shape:
            problems.append(f"tensor {name!r} has shape {list(disk_shape)}, expected {list(shape)}")
        required = next((d for suffix, d in _QUANT_DTYPES.items() if name.endswith(suffix)), None)
        if required is not None and disk_dtype != required:
            problems.append(f"tensor {name!r} is {disk_dtype}, expected {required}")
        if len(problems) >= 8:
            break
    if problems:
        raise CorruptCheckpointError(
            "This lrpq checkpoint does not match its quantization config: " + "; ".join(problems) + ". It is "
            "corrupt, was modified, or was written by an incompatible version; re-export it with optimum-lrpq."
        )
