"""`export_onnx`: an lrpq-quantized model as a QDQ ONNX model that ONNX Runtime runs with integer kernels.

The model's quantized modules are swapped for their export form (`optimum_lrpq.export.graph`) and the model is
exported with `torch.onnx.export(..., dynamo=True)`, its custom ops translated here to `QuantizeLinear` (+ `Clip`
on the codes below 8 bits), `DequantizeLinear` and `BitShift`. The result is standard ONNX (opset 18-23, default 20): int8
weight initializers with per-output-channel scales and zero points, uint8 activation codes, float LayerNorm,
softmax, GELU and attention matmuls. ONNX Runtime's QDQ fusion turns each `DequantizeLinear` pair feeding a `MatMul`
into `MatMulIntegerToFloat` (u8 x s8 -> s32, bias fused); what stays float is reported by `check=True`.

onnx, onnxscript and onnxruntime (the `export` extra) are imported here only, when an export runs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ..configuration import lrpq_config_of
from ..integration import atomic
from .graph import ExportError, check_exportable, export_form

logger = logging.get_logger(__name__)

DEFAULT_OPSET = 20
# torch's ONNX exporter writes opset 18 and newer; 23 is the newest it knows.
OPSETS = range(18, 24)
INSTALL_HINT = 'pip install "optimum-lrpq[export]"'
# ONNX Runtime kernels that multiply integer codes (after its QDQ fusion), and the float ones a product can end in.
INTEGER_PRODUCTS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearConv", "ConvInteger",
                    "DynamicQuantizeMatMul")
FLOAT_PRODUCTS = ("MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "FusedGemm", "NchwcConv")


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and, with `check=True`, how ONNX Runtime runs it.

    `quantize_nodes` / `dequantize_nodes`: QuantizeLinear / DequantizeLinear nodes in the graph. `int8_weights`:
    int8 weight initializers (every quantized layer's codes; no float copy of a quantized weight is written).
    `integer_products` / `float_products`: matrix products ONNX Runtime's optimized graph computes on integer codes /
    in float (`ort_kernels` counts every kernel kind). `max_abs_diff`: the largest |ONNX - PyTorch| output
    difference on the check inputs, `output_range` the PyTorch outputs' max - min, `same_argmax` the share of rows
    whose arg max agrees (over the outputs named *logits)."""

    path: str
    opset: int
    input_name: str
    output_names: list[str]
    size_bytes: int
    quantize_nodes: int
    dequantize_nodes: int
    int8_weights: int
    integer_products: int | None = None
    float_products: int | None = None
    max_abs_diff: float | None = None
    output_range: float | None = None
    same_argmax: float | None = None
    ort_kernels: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """Two lines for people: the graph, and (after a check) how ONNX Runtime runs it."""
        lines = [(f"{self.path} ({self.size_bytes / 2**20:.1f} MiB, opset {self.opset}): {self.quantize_nodes} "
                  f"QuantizeLinear, {self.dequantize_nodes} DequantizeLinear, {self.int8_weights} int8 weight "
                  "initializers")]
        if self.max_abs_diff is not None:
            argmax = ("" if self.same_argmax is None
                      else f", same arg max on {100 * self.same_argmax:.0f}% of the check inputs")
            lines.append(
                f"ONNX Runtime: {self.integer_products} matrix products on integer kernels, {self.float_products} in "
                f"float; max |ONNX - PyTorch| = {self.max_abs_diff:.3g} (output range {self.output_range:.3g})"
                f"{argmax}")
        return "\n".join(lines)


def _require(module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"Exporting to ONNX needs {module} ({purpose}), which is not installed: {INSTALL_HINT}"
                          ) from err


def _translation_table(opset: int) -> dict:
    """The ONNX form of the custom ops of `graph`: QuantizeLinear with scale 1 and zero point 0 (+ Clip of the codes
    to the `bits`-bit range), DequantizeLinear, BitShift."""
    import numpy as np
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)

    def quantize(t, bits: int):
        # t is x / scale + zero_point already: QuantizeLinear only rounds (half to even) and saturates to [0, 255]
        codes = op.QuantizeLinear(t, op.Constant(value=ir.tensor(np.float32(1.0))),
                                  op.Constant(value=ir.tensor(np.uint8(0))))
        if bits < 8:  # an exact integer clamp to the code range of `bits` bits
            codes = op.Clip(codes, None, op.Constant(value=ir.tensor(np.uint8((1 << bits) - 1))))
        return codes

    def dequantize(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def shift_left(codes, shifts):
        return op.BitShift(codes, shifts, direction="LEFT")

    return {torch.ops.lrpq.quantize.default: quantize, torch.ops.lrpq.dequantize.default: dequantize,
            torch.ops.lrpq.shift_left.default: shift_left}


class _Outputs(nn.Module):
    """The model as a function of pixel values returning its output tensors (by name, in a fixed order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values=pixel_values)
        return tuple(output[name] for name in self.names)


def _output_names(output) -> list[str]:
    names = [name for name, value in output.items() if isinstance(value, torch.Tensor)]
    if not names:
        raise ExportError("The model returned no tensor to export.")
    return names


def example_pixels(model: nn.Module, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Random pixel values of the shape `model.config` describes (image_size, num_channels), on the model's device."""
    config = model.config
    size = getattr(config, "image_size", None)
    if size is None:
        raise ExportError(f"{type(model).__name__}'s config has no image_size; pass example_inputs=.")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    device = next(model.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, getattr(config, "num_channels", 3), height, width, generator=generator).to(device)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> str:
    """Absolute `path` after checking that the export may write it (see `integration.atomic.check_output_file`), as an
    ExportError otherwise."""
    try:
        return atomic.check_output_file(path, overwrite)
    except atomic.OutputExistsError as err:
        raise ExportError(str(err)) from err


@contextlib.contextmanager
def _quiet_exporter():
    """torch's ONNX exporter without its notes that concern torch itself, not the export (no torchvision to register
    its ops for, deprecations inside torch.export)."""
    import logging
    import warnings

    exporter_logger = logging.getLogger("torch.onnx")
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
            yield
    finally:
        exporter_logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _graph_counts(path: str) -> tuple[int, int, int]:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    int8 = sum(1 for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2)
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), int8


def onnxruntime_session(path: str, threads: int | None = None, optimized_path: str | None = None):
    """An ONNX Runtime CPU session of `path` with every graph optimization on (QDQ fusion into integer kernels);
    `optimized_path`: also write the optimized graph there."""
    ort = _require("onnxruntime", "running and checking the exported model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # no warning about hardware-specific optimized graphs
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _check(result: OnnxExport, model: nn.Module, example: torch.Tensor) -> None:
    """Run the file in ONNX Runtime on `example`, compare with `model`, and count its integer / float products."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="lrpq-onnx-check-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session = onnxruntime_session(result.path, optimized_path=optimized)
        ort_outputs = session.run(result.output_names, {result.input_name: example.detach().cpu().numpy()})
        kernels: dict[str, int] = {}
        for node in onnx.load(optimized, load_external_data=False).graph.node:
            kernels[node.op_type] = kernels.get(node.op_type, 0) + 1
    with torch.no_grad():
        reference = model(pixel_values=example)
    diff, low, high, same, rows = 0.0, float("inf"), float("-inf"), 0, 0
    for name, ort_output in zip(result.output_names, ort_outputs, strict=True):
        expected = reference[name].detach().float().cpu()
        got = torch.from_numpy(ort_output).float()
        diff = max(diff, (got - expected).abs().max().item())
        low, high = min(low, expected.min().item()), max(high, expected.max().item())
        if name.endswith("logits") and expected.dim() == 2:  # [batch, classes]
            same += int((got.argmax(-1) == expected.argmax(-1)).sum())
            rows += expected.shape[0]
    result.max_abs_diff, result.output_range = diff, high - low
    result.same_argmax = same / rows if rows else None
    result.ort_kernels = dict(sorted(kernels.items()))
    result.integer_products = sum(kernels.get(k, 0) for k in INTEGER_PRODUCTS)
    result.float_products = sum(kernels.get(k, 0) for k in FLOAT_PRODUCTS)
    if diff > 0.5 * max(result.output_range, 1e-12):
        # codes that flip where ONNX Runtime's float kernels round differently move outputs by a step or two; half
        # the output range means the graph computes something else
        logger.warning(f"The ONNX model's outputs differ from PyTorch's by {diff:.3g} for an output range of "
                       f"{result.output_range:.3g} on the check inputs; the export may be wrong. Please report it.")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None,
                example_inputs: torch.Tensor | None = None, check: bool = True, overwrite: bool = False) -> OnnxExport:
    """Write an lrpq-quantized model as a QDQ ONNX model that ONNX Runtime runs with integer kernels.

    Weights of every width (2-8 bits) are int8 initializers with per-output-channel scales and zero points behind a
    `DequantizeLinear`; each quantized linear layer's input is quantized by a `QuantizeLinear` (uint8 codes, clipped
    to the layer's bit width); LayerNorm, softmax, GELU, residual adds and the attention matmuls stay in float, as in
    PyTorch. See `optimum_lrpq.export.graph` for how per-channel grids, fractional zero points and the log2 softmax
    quantizer are written, and README "Export to ONNX" for what ONNX Runtime runs in integer arithmetic.

    Args:
        model: an lrpq-quantized image classifier (`LRPQuantizer.quantize_model` or `from_pretrained` of a quantized
            checkpoint), in float32. It is left as it was.
        path: the `.onnx` file to write (atomically: a partial file never appears at `path`).
        opset: ONNX opset, 18-23 (default 20).
        example_inputs: pixel values to trace and check with (default: 2 random images of `model.config`'s size).
            The batch dimension of the ONNX model is dynamic whatever their number (with static shapes ONNX Runtime
            turns MatMul + bias into a float Gemm before its QDQ fusion could make it an integer GEMM); the image size
            is theirs.
        check: run the written file in ONNX Runtime on the example, compare with `model`, and count which products
            run on integer kernels (needs onnxruntime).
        overwrite: replace an existing file at `path`.

    Returns:
        An `OnnxExport` describing the file (and, with `check`, the comparison); `.summary()` prints it.
    """
    if lrpq_config_of(model) is None:
        raise ExportError(f"{type(model).__name__} is not an lrpq-quantized model (its config has no lrpq "
                          "quantization_config); quantize it first with LRPQuantizer(LRPQConfig(...)).quantize_model("
                          "model, images), or load a quantized checkpoint.")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {OPSETS.start}-{OPSETS.stop - 1} "
                          f"(default {DEFAULT_OPSET}).")
    check_exportable(model)
    target = check_output_path(path, overwrite)
    _require("onnx", "writing the graph")
    _require("onnxscript", "translating the graph")
    if check:
        _require("onnxruntime", "checking the exported model; pass check=False (--no-check) to skip the check")
    example = example_pixels(model) if example_inputs is None else example_inputs
    if example.shape[0] < 2:  # torch.export specializes a dimension traced at size 1
        example = torch.cat([example, example])

    with _eval_mode(model), torch.no_grad(), _quiet_exporter(), export_form(model, example) as twin:
        names = _output_names(twin(pixel_values=example))
        dynamic_shapes = ({0: torch.export.Dim("batch")},)
        program = torch.onnx.export(
            _Outputs(twin, names).eval(), (example,), None, dynamo=True, input_names=["pixel_values"], output_names=names,
            opset_version=opset, dynamic_shapes=dynamic_shapes, custom_translation_table=_translation_table(opset),
            optimize=True, verbose=False)
    try:
        with atomic.staged_file(target, overwrite=overwrite) as staging:
            program.save(staging)
    except atomic.OutputExistsError as err:  # appeared while exporting
        raise ExportError(str(err)) from err
    result = OnnxExport(target, opset, "pixel_values", names, os.path.getsize(target), *_graph_counts(target))
    if check:
        with _eval_mode(model):
            _check(result, model, example)
    logger.info(result.summary())
    return result
