"""End-to-end CPU latency and memory of quantized vision transformers, each variant in a fresh process.

For each model (a ViT-Base config with random weights at 224 px, and the DINOv2-S benchmark model of ``zoo.py`` at
112 px) and each batch size, prints one table: median forward latency (after warm-up, ``torch.inference_mode()``),
its ratio to float32 and to bf16, and the resident memory (RSS) a model adds once loaded and run once, for

- ``float32`` and ``bf16`` (the float checkpoint saved as bf16 and loaded with ``dtype=torch.bfloat16``, bf16
  inputs);
- ``lrpq`` W8A8, W4A8, W4A4 and mixed W4A4 (``mixed_precision=True``), each with the integer kernel backend
  (``onednn``), the same with the ``torch.compile``'d input quantization (``OPTIMUM_LRPQ_ONEDNN_COMPILE=1``) and
  the ``reference`` backend (dequantize + float matmul), and ``onnxruntime``: the checkpoint exported once by
  ``optimum_lrpq.export_onnx`` (QDQ ONNX, int8 weights) and run by an ONNX Runtime CPU session
  (``intra_op_num_threads`` = ``--threads``, all graph optimizations: every quantized layer an integer GEMM);
- ``torchao`` ``Int8DynamicActivationInt8WeightConfig`` and ``optimum-quanto`` W8A8 (``quantize`` + ``Calibration``
  on the 32 calibration images + ``freeze``, as ``accuracy.py`` does).

Every row runs in a fresh subprocess that loads the model the way a user does:
``AutoModelForImageClassification.from_pretrained(folder)`` of a ``save_pretrained`` folder written once by this
script (lrpq checkpoints are quantized once, on 32 calibration images; the subprocess picks the kernel backend with
``OPTIMUM_LRPQ_KERNEL_BACKEND``; the onnxruntime rows load the ``.onnx`` file exported from it in the setup). torchao and quanto have no such checkpoint here: their subprocess loads the float32
checkpoint and quantizes it (their "load s" column includes that). RSS (psutil) is read after the imports and the
inputs are made, and again after load + first forward; the table gives the difference and its ratio to float32's.

For the DINOv2 model it also prints the top-1 accuracy on the zoo's real MNIST test digits of every lrpq setting with
the ``onednn`` backend next to the ``reference`` backend (the same checkpoint; only the backend differs).

    python benchmarks/latency.py                                      # both models, batch 1 and 32, 2 threads
    python benchmarks/latency.py --models vit-base --batch-sizes 1 --repeats 2 --warmup 1 --skip-accuracy
    python benchmarks/latency.py --models dinov2 --variants onednn --accuracy-limit 200 --markdown /tmp/lat.md
    python benchmarks/latency.py --workdir /tmp/lat-ckpt ...          # keep (and reuse) the quantized checkpoints
    python benchmarks/latency.py --models vit-base --batch-sizes 32 --variants "W4A4 onednn" "W8A8 onednn" \
        onnxruntime --skip-accuracy                                   # ONNX Runtime next to the onednn backend

Latencies move with whatever else runs on the machine: run it on an otherwise idle CPU, and compare rows of one
run only. Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MIB = 2**20
MODELS = ("vit-base", "dinov2")
IMAGE_SIZE = {"vit-base": 224, "dinov2": 112}
CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 0
VIT_SEED = 0
# lrpq checkpoints: one per setting (saved once); the rows differ in the kernel backend only.
LRPQ_SETTINGS = {
    "W8A8": {"weight_bits": 8, "activation_bits": 8},
    "W4A8": {"weight_bits": 4, "activation_bits": 8},
    "W4A4": {"weight_bits": 4, "activation_bits": 4},
    "mixed W4A4": {"weight_bits": 4, "activation_bits": 4, "mixed_precision": True},
}
ACCURACY_MODEL = "dinov2"


@dataclass(frozen=True)
class Variant:
    kind: str  # "float32" | "bf16" | "lrpq" | "torchao" | "quanto"
    setting: str | None = None  # lrpq: a key of LRPQ_SETTINGS
    backend: str | None = None  # lrpq: kernel backend, or "onnxruntime" (the exported .onnx file in ONNX Runtime)
    compiled: bool = False  # lrpq onednn: torch.compile'd input quantization

    @property
    def name(self) -> str:
        if self.kind == "lrpq":
            return f"lrpq {self.setting} {self.backend}{'+compile' if self.compiled else ''}"
        return {"torchao": "torchao int8 dyn. W8A8", "quanto": "quanto W8A8"}.get(self.kind, self.kind)


VARIANTS = [Variant("float32"), Variant("bf16")]
for _setting in LRPQ_SETTINGS:
    VARIANTS += [Variant("lrpq", _setting, "onednn"), Variant("lrpq", _setting, "onednn", compiled=True),
                 Variant("lrpq", _setting, "reference"), Variant("lrpq", _setting, "onnxruntime")]
VARIANTS += [Variant("torchao"), Variant("quanto")]
ALWAYS = ("float32", "bf16")  # the ratio columns need them


def _log(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def _onnx_key(setting: str) -> str:
    return _checkpoint_key(setting) + ".onnx"


def _checkpoint_key(variant_or_setting: Variant | str) -> str:
    if isinstance(variant_or_setting, str):
        return "lrpq-" + variant_or_setting.lower().replace(" ", "-")
    v = variant_or_setting
    if v.kind == "lrpq":
        return _checkpoint_key(v.setting)
    return "bf16" if v.kind == "bf16" else "float32"  # torchao / quanto start from the float32 checkpoint


# =============================================================================================== subprocess side


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _lrpq_backend_note(model, counts_before: dict, counts_after: dict) -> list[str]:
    """Which backend the quantized layers resolved to, and how many linear calls took the integer path."""
    from optimum_lrpq.nn import is_quantized_module

    backends = sorted({m.backend().name for m in model.modules() if is_quantized_module(m) and hasattr(m, "backend")})
    notes = [f"layers on {'/'.join(backends) or '?'}"]
    integer = counts_after.get("integer", 0) - counts_before.get("integer", 0)
    fallback = counts_after.get("reference", 0) - counts_before.get("reference", 0)
    if integer or fallback:
        notes.append(f"{integer}/{integer + fallback} linear calls integer")
    return notes


def _load(spec: dict):
    """The model of ``spec`` loaded as a user would (torchao / quanto: quantized here), plus notes."""
    import torch
    from transformers import AutoModelForImageClassification

    kind, notes = spec["kind"], []
    if kind == "bf16":
        model = AutoModelForImageClassification.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16)
    else:
        model = AutoModelForImageClassification.from_pretrained(spec["checkpoint"])
    model.eval()
    if kind == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    elif kind == "quanto":
        from optimum.quanto import Calibration, freeze, qint8, quantize

        calibration = torch.load(spec["calibration"])
        quantize(model, weights=qint8, activations=qint8)
        with torch.no_grad(), Calibration():
            for batch in calibration.split(8):
                model(pixel_values=batch)
        freeze(model)
        del calibration
        notes.append("calibrated on 32 images, batch 8")
    return model, notes


def _load_onnxruntime(spec: dict):
    """An ONNX Runtime CPU session of the exported file, as a user makes one (all graph optimizations), plus notes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    return session, [f"onnxruntime {ort.__version__}", *spec.get("onnx_notes", [])]


def _import_model_code(checkpoint: str) -> None:
    """Import, before the memory baseline, the code any model of this architecture needs (transformers' modeling
    utilities, which import torchao where it is installed, and the model's modeling module): ~70 MiB of RSS on this
    machine that a process pays once whatever it loads, not memory of the model."""
    from transformers import AutoConfig, AutoModelForImageClassification

    AutoModelForImageClassification._model_mapping[type(AutoConfig.from_pretrained(checkpoint))]


def _worker_measure(spec: dict) -> dict:
    import torch

    import optimum_lrpq  # noqa: F401  (registers the lrpq quantizer with transformers, as a user's import does)

    onnx_row = spec.get("backend") == "onnxruntime"
    if onnx_row:
        import onnxruntime  # noqa: F401

    if spec["kind"] == "torchao":
        import torchao.quantization  # noqa: F401
    if spec["kind"] == "quanto":
        import optimum.quanto  # noqa: F401
    from optimum_lrpq.kernels import onednn

    torch.set_num_threads(spec["threads"])
    if not onnx_row:
        _import_model_code(spec["checkpoint"])
    pixel_values = torch.load(spec["inputs"])[: spec["batch_size"]].clone()  # not a view of all inputs
    if spec["kind"] == "bf16":
        pixel_values = pixel_values.to(torch.bfloat16)
    gc.collect()
    rss_before = _rss()
    peak_reset = _reset_peak_rss()

    start = time.perf_counter()
    if onnx_row:
        model, notes = _load_onnxruntime(spec)
        feed = {"pixel_values": pixel_values.numpy()}

        def forward():
            model.run(None, feed)
    else:
        model, notes = _load(spec)

        def forward():
            model(pixel_values=pixel_values)
    load_seconds = time.perf_counter() - start
    counts_before = dict(onednn.PATH_COUNTS)
    with torch.inference_mode():
        start = time.perf_counter()
        forward()
        first_seconds = time.perf_counter() - start
        rss_after = _rss()
        peak = _peak_rss() if peak_reset else None
        counts_after = dict(onednn.PATH_COUNTS)
        for _ in range(spec["warmup"]):
            forward()
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    if spec["kind"] == "lrpq" and not onnx_row:
        notes = _lrpq_backend_note(model, counts_before, counts_after) + notes
        if spec.get("compiled"):
            if onednn._compile_failed:
                notes.append("compile FAILED: eager quantization")
            elif not onednn.COMPILE_QUANTIZE:
                notes.append("compile NOT enabled")
    return {"times": times, "load_seconds": load_seconds, "first_seconds": first_seconds,
            "rss_delta": rss_after - rss_before, "peak_delta": None if peak is None else peak - rss_before,
            "notes": notes, "threads": torch.get_num_threads()}


def _worker_accuracy(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForImageClassification

    import optimum_lrpq  # noqa: F401
    from optimum_lrpq.kernels import onednn

    sys.path.insert(0, str(BENCH_DIR))
    import zoo

    torch.set_num_threads(spec["threads"])
    pixels, labels = zoo.test_set(ACCURACY_MODEL, spec["limit"])
    model = AutoModelForImageClassification.from_pretrained(spec["checkpoint"]).eval()
    predictions = []
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(pixels), 100):
            predictions += model(pixel_values=pixels[begin:begin + 100]).logits.argmax(-1).tolist()
    seconds = time.perf_counter() - start
    accuracy = 100.0 * sum(int(p == y) for p, y in zip(predictions, labels.tolist())) / len(labels)
    return {"accuracy": accuracy, "predictions": predictions, "seconds": seconds,
            "notes": _lrpq_backend_note(model, {}, dict(onednn.PATH_COUNTS))}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = (_worker_accuracy if spec["task"] == "accuracy" else _worker_measure)(spec)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which prints n/a and goes on
        traceback.print_exc()
        result = {"error": type(exc).__name__, "message": str(exc)[:500]}
    Path(spec["result"]).write_text(json.dumps(result))


# =============================================================================================== parent side


def allocator_line() -> str:
    """The memory allocator settings every subprocess inherits (glibc malloc tunables, a preloaded allocator)."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items())
                if k.startswith(("MALLOC_", "GLIBC_TUNABLES")) or k == "LD_PRELOAD"]
    return ", ".join(settings) if settings else "glibc malloc, default settings"


def run_worker(spec: dict, env_extra: dict, workdir: Path, timeout: float, label: str) -> dict:
    """Run one measurement in a fresh interpreter; errors (raised, crashed, timed out) come back as {"error": ...}."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", prefix="spec-", dir=workdir)
    os.close(fd)
    result_path = Path(spec_path).with_suffix(".result.json")
    spec = {**spec, "result": str(result_path)}
    Path(spec_path).write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPTIMUM_LRPQ_KERNEL_BACKEND", "OPTIMUM_LRPQ_ONEDNN_COMPILE")}
    threads = str(spec["threads"])
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **env_extra})
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", spec_path], check=False,
                              env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(BENCH_DIR.parent))
        stderr, returncode = proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        result = {"error": "Timeout", "message": f"no result after {timeout:.0f} s"}
        returncode = None
    else:
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            result = {"error": f"exit {returncode}", "message": "the subprocess died without a result"}
    finally:
        Path(spec_path).unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
    if "error" in result:
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        print(f"  [{label}] {result['error']}: {result.get('message', '')} (exit code {returncode})\n{tail}",
              file=sys.stderr, flush=True)
    return result


def machine_line(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except Exception:  # noqa: BLE001
        capability = {}

    def has(flag: str) -> str:
        value = capability.get(flag) if isinstance(capability, dict) else None
        return "yes" if (value if value is not None else flag in flags) else "no"

    isa = ", ".join(f"{f} {has(f)}" for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16"))
    return (f"CPU {cpu} ({os.cpu_count()} logical cores, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); {isa}; torch {torch.__version__}; {threads} torch threads")


def versions_line() -> str:
    parts = []
    for module, label in (("transformers", "transformers"), ("optimum_lrpq", "optimum_lrpq"),
                          ("optimum.quanto", "optimum-quanto"), ("torchao", "torchao")):
        try:
            imported = __import__(module, fromlist=["__version__"])
            parts.append(f"{label} {getattr(imported, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001
            parts.append(f"{label} unavailable ({type(exc).__name__})")
    return ", ".join(parts)


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "latency-stamp.json"
    return (folder / "config.json").exists() and path.exists() and json.loads(path.read_text()) == stamp


def _write_stamp(folder: Path, stamp: dict) -> None:
    (folder / "latency-stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")


def prepare_model(name: str, folder: Path, settings: list[str], batch_sizes: list[int], vit_rounding: str,
                  threads: int, onnx_settings: tuple[str, ...] = ()) -> tuple[dict[str, Path], list[str]]:
    """Checkpoints (float32, bf16, one per lrpq setting; an ONNX export of those in ``onnx_settings``), calibration
    and timing inputs of ``name`` under ``folder``; reused when a previous run left them with the same stamp. Returns
    the paths and setup log lines (the ONNX notes under ``paths["onnx_notes"][setting]``)."""
    import torch
    from transformers import AutoModelForImageClassification

    import optimum_lrpq
    from optimum_lrpq import LRPQConfig, LRPQuantizer

    torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"float32": folder / "float32", "bf16": folder / "bf16", "calibration": folder / "calibration.pt",
             "inputs": folder / "inputs.pt"}
    log: list[str] = []
    n_inputs = max(batch_sizes)
    base_stamp = {"model": name, "seed": VIT_SEED, "calibration": [CALIBRATION_IMAGES, CALIBRATION_SEED]}
    if name == "dinov2":
        sys.path.insert(0, str(BENCH_DIR))
        import zoo

        base_stamp["zoo_version"] = zoo.ZOO_VERSION

    start = time.perf_counter()
    if not (_stamp_matches(paths["float32"], base_stamp) and _stamp_matches(paths["bf16"], base_stamp)
            and paths["calibration"].exists()):
        if name == "vit-base":
            from transformers import ViTConfig, ViTForImageClassification

            torch.manual_seed(VIT_SEED)
            model = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()
            calibration = torch.randn(CALIBRATION_IMAGES, 3, 224, 224,
                                      generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        else:
            model = zoo.load_model("dinov2")
            calibration = zoo.calibration_images("dinov2", CALIBRATION_IMAGES, seed=CALIBRATION_SEED)
        torch.save(calibration, paths["calibration"])
        model.save_pretrained(paths["float32"])
        _write_stamp(paths["float32"], base_stamp)
        model.to(torch.bfloat16).save_pretrained(paths["bf16"])
        _write_stamp(paths["bf16"], base_stamp)
        del model
        log.append(f"float32 + bf16 checkpoints saved ({time.perf_counter() - start:.1f} s)")
    else:
        log.append("float32 + bf16 checkpoints reused")
    inputs_ok = paths["inputs"].exists() and len(torch.load(paths["inputs"])) >= n_inputs
    if not inputs_ok:
        if name == "vit-base":
            inputs = torch.randn(n_inputs, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        else:
            inputs = zoo.test_set("dinov2", n_inputs)[0]
        torch.save(inputs, paths["inputs"])

    calibration = torch.load(paths["calibration"])
    for setting in settings:
        options = {**LRPQ_SETTINGS[setting], "num_calibration_samples": CALIBRATION_IMAGES}
        options.setdefault("mixed_precision", False)
        if name == "vit-base":
            options["weight_rounding"] = vit_rounding
        target = folder / _checkpoint_key(setting)
        paths[_checkpoint_key(setting)] = target
        stamp = {**base_stamp, "options": options, "optimum_lrpq": optimum_lrpq.__version__}
        if _stamp_matches(target, stamp):
            log.append(f"lrpq {setting}: checkpoint reused")
            continue
        model = AutoModelForImageClassification.from_pretrained(paths["float32"]).eval()
        start = time.perf_counter()
        LRPQuantizer(LRPQConfig(**options)).quantize_model(model, calibration, show_progress=False)
        seconds = time.perf_counter() - start
        model.save_pretrained(target)
        _write_stamp(target, stamp)
        del model
        gc.collect()
        described = ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("weight_bits", "activation_bits"))
        log.append(f"lrpq {setting}: quantized in {seconds:.1f} s ({described})")
        _log(f"{name}: {log[-1]}")
    paths["onnx_notes"] = {}
    for setting in onnx_settings:
        paths[_onnx_key(setting)], paths["onnx_notes"][setting] = _export_onnx(
            name, paths[_checkpoint_key(setting)], folder / _onnx_key(setting), setting, log)
    return paths, log


def _export_onnx(name: str, checkpoint: Path, target: Path, setting: str, log: list[str]) -> tuple[Path, list[str]]:
    """``optimum_lrpq.export_onnx`` of a saved lrpq checkpoint (reused when its stamp matches); the file and the notes
    of its rows (how many products ONNX Runtime runs on integer kernels, the check against PyTorch)."""
    from transformers import AutoModelForImageClassification

    import optimum_lrpq
    import optimum_lrpq.export
    from optimum_lrpq import export_onnx

    stamp_path = target.with_name(target.name + ".stamp.json")
    # the export code itself, so that a changed export is redone
    code = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(
        Path(optimum_lrpq.export.__file__).parent.glob("*.py")))).hexdigest()[:16]
    stamp = {"checkpoint": json.loads((checkpoint / "latency-stamp.json").read_text()),
             "optimum_lrpq": optimum_lrpq.__version__, "export_code": code}
    if target.exists() and stamp_path.exists():
        previous = json.loads(stamp_path.read_text())
        if previous["stamp"] == stamp:
            log.append(f"lrpq {setting}: ONNX export reused")
            return target, previous["notes"]
    model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    start = time.perf_counter()
    result = export_onnx(model, target, overwrite=True)
    seconds = time.perf_counter() - start
    notes = [f"{result.integer_products} products integer, {result.float_products} float"]
    stamp_path.write_text(json.dumps({"stamp": stamp, "notes": notes}, indent=1) + "\n")
    log.append(f"lrpq {setting}: exported to ONNX in {seconds:.1f} s ({target.stat().st_size / MIB:.0f} MiB; "
               f"{'; '.join(notes)})")
    _log(f"{name}: {log[-1]}")
    return target, notes


@dataclass
class Row:
    variant: Variant
    error: str | None = None
    median_ms: float | None = None
    rss_mib: float | None = None
    peak_mib: float | None = None
    load_s: float | None = None
    first_s: float | None = None
    notes: str = ""
    rounds: int = 0


def _aggregate(variant: Variant, results: list[dict]) -> Row:
    """One row from the rounds of one variant: the median of the per-round medians (and of the memory figures)."""
    good = [r for r in results if "error" not in r]
    if not good:
        return Row(variant, error=results[0]["error"] if results else "not run")

    def med(key: str, scale: float = 1.0) -> float | None:
        values = [r[key] for r in good if r.get(key) is not None]
        return statistics.median(values) / scale if values else None

    medians = [statistics.median(r["times"]) * 1e3 for r in good if r["times"]]
    notes = list(dict.fromkeys(n for r in good for n in r["notes"]))
    if len(good) < len(results):
        notes.append(f"{len(results) - len(good)} of {len(results)} rounds failed")
    return Row(variant, median_ms=statistics.median(medians) if medians else None, rss_mib=med("rss_delta", MIB),
               peak_mib=med("peak_delta", MIB), load_s=med("load_seconds"), first_s=med("first_seconds"),
               notes="; ".join(notes), rounds=len(good))


HEADER = ("variant", "median ms", "x fp32", "x bf16", "RSS delta MiB", "RSS x fp32", "peak delta MiB", "load s",
          "1st fwd s", "notes")


def _fmt(value: float | None, pattern: str) -> str:
    return "" if value is None else format(value, pattern)


def latency_table(rows: list[Row], markdown: bool) -> list[str]:
    by_kind = {r.variant.kind: r for r in rows if r.variant.kind in ALWAYS}
    fp32, bf16 = by_kind.get("float32"), by_kind.get("bf16")
    cells = []
    for r in rows:
        if r.error is not None:
            cells.append((r.variant.name, f"n/a ({r.error})", *[""] * (len(HEADER) - 2)))
            continue

        def ratio(value, base):
            return f"{value / base:.2f}" if value is not None and base not in (None, 0) else ""

        cells.append((r.variant.name, _fmt(r.median_ms, ".1f"), ratio(r.median_ms, fp32 and fp32.median_ms),
                      ratio(r.median_ms, bf16 and bf16.median_ms), _fmt(r.rss_mib, ".0f"),
                      ratio(r.rss_mib, fp32 and fp32.rss_mib), _fmt(r.peak_mib, ".0f"), _fmt(r.load_s, ".1f"),
                      _fmt(r.first_s, ".2f"), r.notes))
    return _table(HEADER, cells, markdown, left=(0, len(HEADER) - 1))


def _table(header: tuple, cells: list[tuple], markdown: bool, left: tuple[int, ...]) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(c) + " |" for c in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [line(header), line(["-" * w for w in widths])] + [line(c).rstrip() for c in cells]


def accuracy_table(results: dict[str, dict[str, dict]], markdown: bool) -> list[str]:
    header = ("lrpq setting", "onednn top-1 %", "reference top-1 %", "difference (pts)", "same prediction %", "notes")
    cells = []
    for setting, by_backend in results.items():
        one, ref = by_backend.get("onednn", {}), by_backend.get("reference", {})

        def acc(result):
            return f"{result['accuracy']:.1f}" if "accuracy" in result else f"n/a ({result.get('error', '?')})"

        diff = same = ""
        if "accuracy" in one and "accuracy" in ref:
            diff = f"{one['accuracy'] - ref['accuracy']:+.1f}"
            pairs = list(zip(one["predictions"], ref["predictions"]))
            same = f"{100.0 * sum(a == b for a, b in pairs) / len(pairs):.1f}"
        notes = "; ".join(f"{b}: {', '.join(r.get('notes', []))}" for b, r in by_backend.items() if r.get("notes"))
        cells.append((f"lrpq {setting}", acc(one), acc(ref), diff, same, notes))
    return _table(header, cells, markdown, left=(0, len(header) - 1))


def _write_markdown(path: Path | None, lines: list[str]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def _matches(variant: Variant, patterns: list[str] | None) -> bool:
    if variant.kind in ALWAYS or not patterns:
        return True
    return any(p.lower() in variant.name.lower() for p in patterns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per subprocess (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards after the first one")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every subprocess this many times, interleaved; report the median of the medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only variants whose name contains one of these substrings (case-insensitive); "
                             "float32 and bf16 are always kept. Names: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--skip-accuracy", action="store_true", help="no DINOv2 onednn-vs-reference accuracy table")
    parser.add_argument("--accuracy-limit", type=int, default=1000, help="first N zoo test digits (default 1000)")
    parser.add_argument("--vit-weight-rounding", choices=["gptq", "nearest"], default="nearest",
                        help="weight rounding of the ViT-Base checkpoints (random weights: accuracy is irrelevant, "
                             "and the packed format and so the speed are the same; GPTQ only costs setup time)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the checkpoints here and reuse them in later runs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if _matches(v, args.variants)]
    settings = [s for s in LRPQ_SETTINGS if any(v.kind == "lrpq" and v.setting == s for v in variants)]
    onnx_settings = tuple(v.setting for v in variants if v.backend == "onnxruntime")
    accuracy_settings = [] if args.skip_accuracy or ACCURACY_MODEL not in args.models else settings

    started = datetime.datetime.now()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lrpq-latency-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    header = [
        f"command: {shlex.join(['python', *sys.argv])}",
        f"date: {started:%Y-%m-%d %H:%M}; load average at start: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"machine: {machine_line(args.threads)}",
        f"versions: {versions_line()}",
        f"allocator: {allocator_line()}",
        (f"timing: {args.warmup} warm-up + {args.repeats} timed forwards after the first, torch.inference_mode(), "
         f"median over the timed ones{f', median of {args.rounds} rounds' if args.rounds > 1 else ''}"),
    ]
    print("\n".join(header), flush=True)
    markdown = [f"- {line}" for line in header]
    footnotes = [
        ("Every row is a fresh subprocess: `AutoModelForImageClassification.from_pretrained(folder)` of a "
         "`save_pretrained` folder written once by this script (bf16: the float checkpoint saved in bf16, loaded with "
         "`dtype=torch.bfloat16`, bf16 inputs; lrpq: `import optimum_lrpq` first, kernel backend chosen with "
         "`OPTIMUM_LRPQ_KERNEL_BACKEND`, `+compile` adds `OPTIMUM_LRPQ_ONEDNN_COMPILE=1`)."),
        ("torchao (`quantize_(model, Int8DynamicActivationInt8WeightConfig())`) and quanto (`quantize(model, "
         "weights=qint8, activations=qint8)`, `Calibration()` over the 32 calibration images in batches of 8, "
         "`freeze`) quantize inside the measuring subprocess after loading the float32 checkpoint: their `load s` "
         "includes the quantization and their RSS whatever it leaves behind."),
        ("RSS delta: psutil RSS after load + first forward minus RSS before the load (read after the imports and "
         "after the input batch exists). peak delta: the kernel's high-water mark (VmHWM, reset before the load) "
         "minus the same baseline. `1st fwd s` includes one-time work (weight preparation, torch.compile)."),
        ("onnxruntime: the lrpq checkpoint exported once with `optimum_lrpq.export_onnx` (QDQ ONNX, opset 20, "
         "dynamic batch), run by `onnxruntime.InferenceSession` on the CPU execution provider with all graph "
         "optimizations, `intra_op_num_threads` = --threads; `load s` is the session creation (graph optimization), "
         "not the export."),
        (f"vit-base: `ViTForImageClassification(ViTConfig(num_labels=1000))`, random weights (seed {VIT_SEED}), "
         f"224 px, lrpq calibrated on 32 random-normal images with weight_rounding={args.vit_weight_rounding!r} "
         "(random weights: accuracy is meaningless there; rounding does not change the packed format or the speed). "
         "dinov2: the zoo.py DINOv2-S MNIST model, 112 px, 32 calibration digits (seed 0), library defaults (GPTQ)."),
    ]

    for name in args.models:
        _log(f"{name}: preparing checkpoints in {workdir / name}")
        setup_start = time.perf_counter()
        try:
            paths, setup_log = prepare_model(name, workdir / name, sorted(set(settings) | set(accuracy_settings),
                                             key=list(LRPQ_SETTINGS).index), args.batch_sizes,
                                             args.vit_weight_rounding, args.threads, onnx_settings)
        except Exception as exc:  # noqa: BLE001 -- the other model can still run
            traceback.print_exc()
            print(f"\n## {name}: setup failed ({type(exc).__name__}: {exc})", flush=True)
            markdown += ["", f"### {name}: setup failed ({type(exc).__name__})"]
            continue
        setup_line = f"{name} setup: {time.perf_counter() - setup_start:.1f} s ({'; '.join(setup_log)})"
        print(f"\n{setup_line}", flush=True)
        markdown += ["", f"- {setup_line}"]

        for batch_size in args.batch_sizes:
            per_variant: dict[Variant, list[dict]] = {v: [] for v in variants}
            for round_index in range(args.rounds):
                for v in variants:
                    spec = {"task": "measure", "kind": v.kind, "checkpoint": str(paths[_checkpoint_key(v)]),
                            "calibration": str(paths["calibration"]), "inputs": str(paths["inputs"]),
                            "batch_size": batch_size, "threads": args.threads, "warmup": args.warmup,
                            "repeats": args.repeats, "compiled": v.compiled}
                    if v.backend == "onnxruntime":
                        spec.update(backend=v.backend, onnx=str(paths[_onnx_key(v.setting)]),
                                    onnx_notes=paths["onnx_notes"][v.setting])
                    env = {}
                    if v.kind == "lrpq" and v.backend != "onnxruntime":
                        env["OPTIMUM_LRPQ_KERNEL_BACKEND"] = v.backend
                        env["OPTIMUM_LRPQ_ONEDNN_COMPILE"] = "1" if v.compiled else "0"
                    label = f"{name} b{batch_size} {v.name}"
                    start = time.perf_counter()
                    result = run_worker(spec, env, workdir, args.timeout, label)
                    per_variant[v].append(result)
                    summary = (f"n/a ({result['error']})" if "error" in result
                               else f"{statistics.median(result['times']) * 1e3:.1f} ms" if result["times"] else "ok")
                    _log(f"{label}{f' round {round_index + 1}' if args.rounds > 1 else ''}: {summary} "
                         f"({time.perf_counter() - start:.0f} s)")
            rows = [_aggregate(v, per_variant[v]) for v in variants]
            title = f"{name}, {IMAGE_SIZE[name]} px, batch {batch_size}, {args.threads} threads"
            print(f"\n## {title}\n" + "\n".join(latency_table(rows, markdown=False)), flush=True)
            markdown += ["", f"### {title}", "", *latency_table(rows, markdown=True)]
            _write_markdown(args.markdown, markdown + ["", "(partial: run in progress)"])

        if name == ACCURACY_MODEL and accuracy_settings:
            accuracy: dict[str, dict[str, dict]] = {}
            for setting in accuracy_settings:
                accuracy[setting] = {}
                for backend in ("onednn", "reference"):
                    spec = {"task": "accuracy", "checkpoint": str(paths[_checkpoint_key(setting)]),
                            "threads": args.threads, "limit": args.accuracy_limit}
                    env = {"OPTIMUM_LRPQ_KERNEL_BACKEND": backend, "OPTIMUM_LRPQ_ONEDNN_COMPILE": "0"}
                    label = f"{name} accuracy lrpq {setting} {backend}"
                    result = run_worker(spec, env, workdir, args.timeout, label)
                    accuracy[setting][backend] = result
                    _log(f"{label}: " + (f"{result['accuracy']:.1f}% ({result['seconds']:.0f} s)"
                                         if "accuracy" in result else f"n/a ({result['error']})"))
            title = (f"{name}: top-1 accuracy, first {args.accuracy_limit} zoo test digits, same checkpoint, "
                     "onednn vs reference backend")
            print(f"\n## {title}\n" + "\n".join(accuracy_table(accuracy, markdown=False)), flush=True)
            markdown += ["", f"### {title}", "", *accuracy_table(accuracy, markdown=True)]
            _write_markdown(args.markdown, markdown + ["", "(partial: run in progress)"])

    elapsed = (datetime.datetime.now() - started).total_seconds()
    end_line = (f"total: {elapsed / 60:.1f} min; load average at end: "
                + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("\nNotes:\n" + "\n".join(f"{i}. {note}" for i, note in enumerate(footnotes, 1)), flush=True)
    print(f"\n{end_line}", flush=True)
    markdown += ["", "Notes:", "", *[f"{i}. {note}" for i, note in enumerate(footnotes, 1)], "", end_line]
    if args.markdown:
        _write_markdown(args.markdown, markdown)
        print(f"markdown written to {args.markdown}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
