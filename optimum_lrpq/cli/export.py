"""`optimum-lrpq export`: an lrpq-quantized model as a QDQ ONNX model that ONNX Runtime runs with integer kernels."""

from __future__ import annotations

import argparse
import os

from .common import CLIError, add_quiet_argument, check_quantized_model, load_model, one_line

FORMATS = ("onnx",)
DEFAULT_FILE = "model.onnx"


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser(
        "export", help="write a quantized model as a QDQ ONNX model for ONNX Runtime",
        description="Write an lrpq-quantized model as an ONNX model in QDQ form (int8 weights, uint8 activation "
        "codes; QuantizeLinear / DequantizeLinear around every quantized layer), which ONNX Runtime runs with "
        "integer GEMMs; then run it in ONNX Runtime next to the PyTorch model and print how it compares.",
    )
    e.add_argument("model", metavar="DIR", help="quantized model directory (or Hub id)")
    e.add_argument("--format", default="onnx", metavar="FORMAT",
                   help=f"export format: {', '.join(FORMATS)} (default: %(default)s)")
    e.add_argument("--output", "-o", metavar="FILE",
                   help=f"the file to write (default: DIR/{DEFAULT_FILE} for a local directory, else "
                        "./<model name>.onnx)")
    e.add_argument("--opset", type=int, metavar="N", help="ONNX opset, 18-23 (default: 20)")
    e.add_argument("--no-check", action="store_true",
                   help="skip running the written model in ONNX Runtime and comparing it with PyTorch")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_quiet_argument(e)
    e.set_defaults(func=run)
    return e


def default_output(model: str) -> str:
    """Where the export goes without --output: into the model directory, or ./<name>.onnx for a Hub id."""
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.join(model, DEFAULT_FILE)
    return os.path.basename(os.path.normpath(model)) + ".onnx"


def run(args) -> int:
    if args.format.lower() not in FORMATS:
        raise CLIError(f"Unsupported export format {args.format!r}; choose one of {', '.join(FORMATS)} (OpenVINO, "
                       "TensorRT and other runtimes read the ONNX model).")
    check_quantized_model(args.model, fix="quantize it first with 'optimum-lrpq quantize'.")
    from ..export import ExportError, export_onnx
    from ..export.onnx_export import check_output_path

    output = args.output or default_output(args.model)
    try:
        check_output_path(output, args.overwrite)
    except ExportError as err:
        raise CLIError(str(err)) from err
    model = load_model(args.model)
    try:
        result = export_onnx(model, output, opset=args.opset, check=not args.no_check, overwrite=args.overwrite)
    except (ExportError, ImportError) as err:
        raise CLIError(one_line(err)) from err
    print(result.summary())
    return 0
