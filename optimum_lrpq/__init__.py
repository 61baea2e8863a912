"""optimum-lrpq: LRP-guided mixed-precision post-training quantization (LRP-QViT) for vision transformers.

Importing the package registers the `lrpq` quantization method (config and quantizer) and the `lrpq` attention
function with transformers, so quantized checkpoints load with `AutoModelForImageClassification.from_pretrained`.

The import itself is light (no torch, no transformers), so that `optimum-lrpq --help` and the command-line parser
start at once:

- the public names (`LRPQConfig`, `LRPQuantizer`, `export_onnx`, `set_kernel_backend`, `supported_models`) are
  imported on first use (PEP 562 `__getattr__`); `export_onnx` imports onnx only when an export runs;
- registration with transformers happens right away when transformers' modeling code is already loaded, and
  otherwise as soon as it is (the import hook of `optimum_lrpq_autoload`, armed here even when
  `OPTIMUM_LRPQ_NO_AUTOLOAD=1` switched off its start-up installation), which is before any `from_pretrained` can
  read a checkpoint. `register()` does it at once, explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .configuration import LRPQConfig
    from .export import export_onnx
    from .integration.quantizer import LRPQuantizer
    from .models import supported_models
    from .nn import set_kernel_backend

__all__ = ["LRPQConfig", "LRPQuantizer", "__version__", "export_onnx", "register", "set_kernel_backend",
           "supported_models"]


def register() -> None:
    """Register the `lrpq` quantization method and attention function with transformers (idempotent)."""
    from .integration.registration import register as register_with_transformers

    register_with_transformers()


def __getattr__(name: str) -> Any:
    # One explicit import per name (not a table of strings), so that the import-floor check sees these edges.
    if name == "LRPQConfig":
        from .configuration import LRPQConfig as value
    elif name == "LRPQuantizer":
        from .integration.quantizer import LRPQuantizer as value
    elif name == "supported_models":
        from .models import supported_models as value
    elif name == "export_onnx":
        from .export import export_onnx as value
    elif name == "set_kernel_backend":
        from .nn import set_kernel_backend as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _arm_registration() -> None:
    try:
        import optimum_lrpq_autoload
    except ImportError:  # the hook module is shipped with the package; without it, register now (imports torch)
        register()
        return
    optimum_lrpq_autoload.arm()


_arm_registration()
