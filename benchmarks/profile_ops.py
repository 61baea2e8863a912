"""Where the time of one quantized forward goes, and whether `torch.compile(model)` helps (CPU, one process).

Loads a saved model folder (e.g. one that ``latency.py --workdir DIR`` kept: ``DIR/vit-base/lrpq-w4a4``), runs a few
forwards under ``torch.profiler`` and prints the self CPU time per operator family: the integer GEMMs
(``onednn::qlinear_pointwise``), the attention matmuls (``aten::bmm`` / ``aten::matmul`` under the attention
function), softmax, LayerNorm, GELU, the input quantization (``aten::addcdiv`` / ``round`` / ``clamp`` / ``to``)
and the rest. Then it times the eager model against ``torch.compile(model)`` (median of ``--repeats`` forwards after
warm-up; the compiled model is checked to give the same logits).

    python benchmarks/profile_ops.py /tmp/lrpq-latency/vit-base/lrpq-w4a4 --batch-size 32
    OPTIMUM_LRPQ_KERNEL_BACKEND=reference python benchmarks/profile_ops.py DIR/vit-base/lrpq-w4a4

Run it on an idle machine; not a test.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

FAMILIES = [  # (family, substrings of the profiler's op name), first match wins
    ("integer GEMM (oneDNN)", ("qlinear_pointwise",)),
    ("float GEMM (linear/addmm/mm)", ("aten::addmm", "aten::linear", "aten::mm", "mkldnn_linear")),
    ("attention matmuls (bmm/matmul)", ("aten::bmm", "aten::matmul", "aten::baddbmm")),
    ("softmax", ("softmax",)),
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("input quantization (div/round/clamp/cast)", ("addcdiv", "aten::round", "aten::clamp", "aten::to", "_to_copy",
                                                   "aten::copy_", "aten::div", "aten::index_select")),
    ("log2 / attention-operand quantization", ("aten::log2", "aten::exp2", "aten::pow", "aten::floor", "where")),
    ("elementwise (add/mul/sub)", ("aten::add", "aten::mul", "aten::sub")),
    ("convolution (patch embedding)", ("conv",)),
]


def family_of(name: str) -> str:
    for family, keys in FAMILIES:
        if any(k in name for k in keys):
            return family
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a save_pretrained folder (float or lrpq)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model config's image_size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForImageClassification

    import optimum_lrpq  # noqa: F401  (registers the quantizer)

    model = AutoModelForImageClassification.from_pretrained(args.folder).eval()
    size = args.image_size or model.config.image_size
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(pixel_values=x)  # weight preparation
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                model(pixel_values=x)
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[family_of(event.key)] += event.self_cpu_time_total / 2 / 1e3  # ms per forward
    whole = sum(totals.values())
    print(f"{args.folder}: batch {args.batch_size}, {size} px, {args.threads} threads; self CPU time per forward")
    for family, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {family:45s} {ms:9.1f} ms  {100 * ms / whole:5.1f} %")
    print(f"  {'total':45s} {whole:9.1f} ms")

    if args.skip_compile:
        return

    def timed(fn) -> float:
        times = []
        with torch.inference_mode():
            fn()
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    eager_ms = timed(lambda: model(pixel_values=x))
    start = time.perf_counter()
    compiled = torch.compile(model)
    with torch.inference_mode():
        out = compiled(pixel_values=x).logits
        reference = model(pixel_values=x).logits
    compile_s = time.perf_counter() - start
    compiled_ms = timed(lambda: compiled(pixel_values=x))
    same = torch.equal(out.argmax(-1), reference.argmax(-1))
    diff = (out - reference).abs().max().item() / max((reference.max() - reference.min()).item(), 1e-12)
    print(f"eager {eager_ms:.1f} ms, torch.compile(model) {compiled_ms:.1f} ms ({compiled_ms / eager_ms:.2f}x; "
          f"first call incl. compilation {compile_s:.1f} s; same argmax: {same}, max |diff| / logit range {diff:.1e})")


if __name__ == "__main__":
    main()
