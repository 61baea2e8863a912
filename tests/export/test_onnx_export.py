"""ONNX export (`optimum_lrpq.export_onnx`): the graph is QDQ with int8 weights, ONNX Runtime runs every quantized
layer on an integer kernel, and its outputs match the PyTorch reference backend on real images (MNIST digits).

Each case is quantized and exported once per module (`exported`); the tests read the files. An export costs ~5 s of
CPU (torch.export traces every operation), so the cases cover each architecture once and each setting at least once
(W4A4: ViT, DINOv2; W8A8: DeiT with teacher; mixed 2-8 bits: Swin, and ViT through the command line in
test_export_cli.py) instead of the full product; `test_export_form_matches_reference_in_pytorch` covers more
settings without ONNX.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from tiny_models import IMAGE_SIZE, NUM_LABELS, build

from optimum_lrpq import LRPQConfig, LRPQuantizer, export_onnx, set_kernel_backend
from optimum_lrpq.demo import DIGITS_PATH
from optimum_lrpq.export import ExportError, export_form, onnxruntime_session
from optimum_lrpq.export.graph import ExportLinear
from optimum_lrpq.nn import PackedWeightLayer, QuantLinear

TEST_IMAGES = 16
SETTINGS = {
    "W8A8": {"weight_bits": 8, "activation_bits": 8},
    "W4A4": {"weight_bits": 4, "activation_bits": 4},
    # every width 2-8 is a candidate: int8 initializers of several widths, 2-8 bit activation codes
    "mixed": {"weight_bits": 5, "activation_bits": 5, "mixed_precision": True, "candidate_bits": [2, 3, 4, 5, 6, 7, 8]},
}
# (model, setting, opset)
CASES = [("vit", "W4A4", 20), ("deit_teacher", "W8A8", 20), ("swin", "mixed", 20), ("dinov2", "W4A4", 18)]
CASE_IDS = [f"{model}-{setting}" for model, setting, _ in CASES]


def digits(key: str, count: int) -> torch.Tensor:
    """Real MNIST digits shipped with the package, as the tiny models' input: padded to 32 px, 3 channels, normalized
    like a ViT processor with mean = std = 0.5 (their steps land on exact halves of a 2/255 grid)."""
    images = torch.from_numpy(np.load(DIGITS_PATH)[key][:count]).float() / 255
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return ((images - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()


_QUANTIZED: dict = {}


def float_model(name: str) -> torch.nn.Module:
    """`tiny_models.build(name)`, except a Swin of 3 blocks instead of 4 (its export costs ~2x a ViT's): still a
    shifted-window block, a patch merging and a second stage."""
    if name != "swin":
        return build(name)
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    return SwinForImageClassification(SwinConfig(image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[2, 1],
                                                 num_heads=[2, 4], window_size=4, num_labels=NUM_LABELS)).eval()


def quantized(model: str, setting: str, **options) -> torch.nn.Module:
    """`model` quantized at `setting` on the 64 real calibration digits (enough tokens for per-channel input grids),
    once per (model, setting, options)."""
    key = (model, setting, tuple(sorted(options.items())))
    if key not in _QUANTIZED:
        config = LRPQConfig(**SETTINGS[setting], num_calibration_samples=64, weight_rounding="nearest", **options)
        _QUANTIZED[key] = LRPQuantizer(config).quantize_model(float_model(model), digits("calibration_images", 64),
                                                              show_progress=False)
    return _QUANTIZED[key]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, setting, opset) -> (quantized model, OnnxExport), each exported once."""
    cache = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(model: str, setting: str, opset: int):
        if (model, setting) not in cache:
            qmodel = quantized(model, setting)
            result = export_onnx(qmodel, root / f"{model}-{setting}.onnx", opset=opset,
                                 example_inputs=digits("test_images", 4))
            cache[model, setting] = qmodel, result
        return cache[model, setting]

    return get


def reference_logits(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's outputs on the reference backend (fake quantization in float: the oracle)."""
    previous = {name: m.kernel_backend for name, m in model.named_modules() if isinstance(m, PackedWeightLayer)}
    set_kernel_backend(model, "reference")
    try:
        with torch.no_grad():
            output = model(pixel_values=pixels)
        return {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}
    finally:
        for name, backend in previous.items():
            model.get_submodule(name).kernel_backend = backend


@pytest.mark.parametrize("model_name,setting,opset", CASES, ids=CASE_IDS)
def test_matches_pytorch_on_real_images(exported, model_name, setting, opset):
    model, result = exported(model_name, setting, opset)
    pixels = digits("test_images", TEST_IMAGES)
    expected = reference_logits(model, pixels)
    session = onnxruntime_session(result.path)
    outputs = dict(zip(result.output_names, session.run(None, {"pixel_values": pixels.numpy()}), strict=True))
    assert set(outputs) == set(expected)  # DeiT with teacher: logits, cls_logits, distillation_logits
    for name, value in expected.items():
        got = torch.from_numpy(outputs[name])
        span = (value.max() - value.min()).item()
        per_image = (got - value).abs().amax(-1) / span
        # the codes are the reference's; ONNX Runtime's float kernels (LayerNorm, GELU, softmax) round differently
        # in the last bits, which on rare elements moves a code by one step: most images match to float rounding
        assert (per_image < 1e-4).float().mean() >= 0.9, (name, per_image.tolist())
        assert per_image.max() < 0.1, (name, per_image.tolist())
        assert torch.equal(got.argmax(-1), value.argmax(-1)), name
    assert result.max_abs_diff is not None and result.same_argmax == 1.0  # the export's own check
    assert result.opset == opset and onnx.load(result.path).opset_import[0].version == opset


@pytest.mark.parametrize("model_name,setting,opset", CASES, ids=CASE_IDS)
def test_every_quantized_layer_runs_on_an_integer_kernel(exported, model_name, setting, opset):
    model, result = exported(model_name, setting, opset)
    layers = sum(isinstance(m, PackedWeightLayer) for m in model.modules())
    groups = 0
    with export_form(model, digits("test_images", 2)) as twin:
        for module in twin.modules():
            if isinstance(module, ExportLinear):
                groups += module.groups - 1  # a Gather + GEMM per step group
    # q/k/v, o_proj, fc1, fc2, Swin's reduction, classifiers, and the patch embedding (as patches x weight)
    assert result.integer_products == layers + groups, result.ort_kernels
    assert result.ort_kernels.get("MatMulNBits", 0) == 0  # no weight-only kernel that re-quantizes its input
    # what stays float: the two attention matmuls of each block
    blocks = sum(1 for name, _ in model.named_modules() if name.endswith("attention.softmax_quant"))
    assert result.float_products == 2 * blocks, result.ort_kernels


@pytest.mark.parametrize("model_name,setting,opset", CASES, ids=CASE_IDS)
def test_graph_holds_int8_weights_and_qdq(exported, model_name, setting, opset):
    model, result = exported(model_name, setting, opset)
    graph = onnx.load(result.path).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == result.quantize_nodes > 0
    assert ops.count("DequantizeLinear") == result.dequantize_nodes > ops.count("QuantizeLinear")
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == result.int8_weights
    weights = [m for m in model.modules() if isinstance(m, PackedWeightLayer)]
    assert len(int8) >= len(weights)
    # no float copy of a quantized weight, in either layout
    shapes = set()
    for layer in weights:
        out, row = layer.weight_shape[0], int(np.prod(layer.weight_shape[1:]))
        shapes |= {(out, row), (row, out), tuple(layer.weight_shape)}
    floats = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert not [t.name for t in floats if tuple(t.dims) in shapes]
    # each layer's codes, of whatever width, are its int8 initializer(s): values on its code range, none beyond
    values = {t.name: onnx.numpy_helper.to_array(t) for t in int8}
    widths = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedWeightLayer):
            continue
        held = [v for key, v in values.items() if key.startswith(f"model.{name}.") and "weight" in key]
        assert held, name
        offset = 128 if layer.weight_bits == 8 else 0
        low = min(int(v.min()) for v in held) + offset
        high = max(int(v.max()) for v in held) + offset
        assert 0 <= low and high <= (1 << layer.weight_bits) - 1, (name, layer.weight_bits, low, high)
        widths.add(layer.weight_bits)
    if setting == "mixed":
        assert len(widths) >= 3, widths  # several widths in one graph


def test_export_form_matches_reference_in_pytorch():
    """The rewritten modules compute the reference's codes: in PyTorch (no ONNX Runtime float kernels) the outputs
    are the reference backend's to float rounding, for every way an input reaches its product."""
    pixels = digits("test_images", 8)
    modes, float_modes = set(), set()
    for model_name, setting, options in [("vit", "W4A4", {}), ("deit_teacher", "W8A8", {"input_step_levels": 4}),
                                         ("swin", "mixed", {}),
                                         ("dinov2", "W4A4", {"input_step_levels": 0}),
                                         ("deit", "W4A4", {"linear_input_granularity": "per_tensor"}),
                                         ("vit", "W8A8", {"reparameterize": False})]:
        model = quantized(model_name, setting, **options)
        expected = reference_logits(model, pixels)["logits"]
        with torch.no_grad(), export_form(model, pixels) as twin:
            got = twin(pixel_values=pixels).logits
            modes |= {m.mode for m in twin.modules() if isinstance(m, ExportLinear) and m.input is not None}
            float_modes |= {m.mode for m in twin.modules() if isinstance(m, ExportLinear) and m.input is None}
        span = (expected.max() - expected.min()).item()
        assert (got - expected).abs().max().item() < 1e-5 * span, (model_name, setting, options)
        # the quantized modules are back, and the model computes as before
        assert any(isinstance(m, QuantLinear) for m in model.modules())
        assert not any(isinstance(m, ExportLinear) for m in model.modules())
        assert torch.equal(reference_logits(model, pixels)["logits"], expected)
    assert modes >= {"codes", "shifted", "gathered", "float_codes"}
    assert "float" in float_modes  # the readers of a per-channel LayerNorm grid


def test_batch_dimension_is_dynamic(exported):
    model, result = exported(*CASES[0])  # traced on 4 images
    session = onnxruntime_session(result.path, threads=1)
    for batch in (1, 7):
        pixels = digits("test_images", batch)
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        expected = reference_logits(model, pixels)["logits"]
        assert got.shape == (batch, expected.shape[-1])
        assert np.allclose(got, expected.numpy(), atol=1e-4 * (expected.max() - expected.min()).item())


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one clear message each
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(exported):
    return exported(*CASES[0])[0]


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match="not an lrpq-quantized model.*quantize_model"):
        export_onnx(build("vit"), tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


def test_bad_opset_is_refused(small_model, tmp_path):
    with pytest.raises(ExportError, match="opset 13 is not supported; choose one of 18-23"):
        export_onnx(small_model, tmp_path / "m.onnx", opset=13)


def test_output_path_problems(small_model, tmp_path):
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_onnx(small_model, existing)
    assert existing.read_bytes() == b"keep"
    with pytest.raises(ExportError, match="is a directory; give the file to write"):
        export_onnx(small_model, tmp_path)
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_onnx(small_model, existing / "sub" / "m.onnx")


def test_missing_onnx_names_the_extra(small_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ImportError, match=r'needs onnx .* pip install "optimum-lrpq\[export\]"'):
        export_onnx(small_model, tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


def test_non_float32_model_is_refused(small_model, tmp_path):
    model = copy.deepcopy(small_model).to(torch.bfloat16)  # the shared model stays float32
    with pytest.raises(ExportError, match=r"bfloat16 tensors.*model\.float\(\)"):
        export_onnx(model, tmp_path / "m.onnx")
