"""Export of lrpq-quantized models for other runtimes: a QDQ ONNX model that ONNX Runtime runs with integer kernels.

    from optimum_lrpq import export_onnx
    export_onnx(quantized_model, "model.onnx")          # or: optimum-lrpq export DIR --format onnx

`graph` holds the export form of the quantized modules (torch only); `onnx_export` the ONNX translation, the writer
and the ONNX Runtime check (onnx, onnxscript and onnxruntime are imported only when an export runs: the `export`
extra, `pip install "optimum-lrpq[export]"`).
"""

from .graph import ExportError, export_form
from .onnx_export import OnnxExport, export_onnx, onnxruntime_session

__all__ = ["ExportError", "OnnxExport", "export_form", "export_onnx", "onnxruntime_session"]
