"""Kernels: the arithmetic of quantized layers behind one backend interface (`backend.py`).

Importing this package registers every backend in it. `reference` (dequantize + float matmul) is the default and the
oracle; `onednn` (x86 VNNI/AMX CPUs) and `intmm` (`torch._int_mm`, CUDA) are the integer backends, built on
`integer.IntegerBackend`; another backend is one more file here.
"""

from . import intmm, onednn, reference  # noqa: F401  (registers the reference, oneDNN and torch._int_mm backends)
from .backend import (
    ACTIVATIONS,
    ActivationGrid,
    ConvGeometry,
    KernelBackend,
    PackedWeight,
    apply_activation,
    available_backends,
    check_backend_name,
    get_backend,
    register_backend,
    resolve_backend,
)
from .memory import release_output_buffers, return_freed_memory

__all__ = [
    "ACTIVATIONS",
    "ActivationGrid",
    "ConvGeometry",
    "KernelBackend",
    "PackedWeight",
    "apply_activation",
    "available_backends",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "release_output_buffers",
    "resolve_backend",
    "return_freed_memory",
]
