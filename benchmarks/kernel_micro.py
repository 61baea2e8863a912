"""Micro-benchmark of one quantized linear layer per kernel backend on the ViT-Base shapes (CPU).

    python benchmarks/kernel_micro.py [--threads 2] [--no-compile] [--reps N]

Times, per (M, K, N) with M = 6304 (batch 32 x 197 tokens) and 197 (one image), (K, N) in qkv / o_proj / fc1 / fc2:
  fp32        F.linear on the float32 weight (no quantization at all)
  bf16        F.linear with bfloat16 input, weight and bias (the input already bf16, as in a bf16 model)
  reference   the reference backend: fake-quantize the input, F.linear on the dequantized fp32 weight
  onednn_w4   the oneDNN backend, 4-bit weights (int8 GEMM, every row fits int8), eager input quantization
  onednn_w8   the oneDNN backend, 8-bit weights spanning 0..255 (adds the rank-1 correction pass)
  onednn_w4c  as onednn_w4 with the torch.compile'd input quantization (`OPTIMUM_LRPQ_ONEDNN_COMPILE=1`)
every backend call taking a float32 input with a per-tensor 8-bit grid (fractional zero point) and returning
float32. Calls are interleaved (one of each per repeat) and medians reported, with ratios to fp32 and bf16;
still, the numbers move with whatever else runs on the machine. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from optimum_lrpq.kernels import ActivationGrid, PackedWeight, get_backend, onednn
from optimum_lrpq.quantization import packing

SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))


def packed_weight(n: int, k: int, bits: int, generator: torch.Generator) -> PackedWeight:
    """Per-row min/max quantization of a random N(0, 0.05) weight, as the quantizer stores it."""
    w = torch.randn(n, k, generator=generator) * 0.05
    low, high = w.min(1).values, w.max(1).values
    scale = (high - low) / ((1 << bits) - 1)
    zero_point = torch.round(-low / scale)
    codes = torch.clamp(torch.round(w / scale[:, None] + zero_point[:, None]), 0, (1 << bits) - 1).to(torch.uint8)
    return PackedWeight(packing.pack(codes, bits), bits, (n, k), scale, zero_point)


def bench(fns: dict, reps: int, inner: int) -> dict[str, float]:
    for fn in fns.values():  # warm up (and build caches)
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def time_shape(m: int, k: int, n: int, generator: torch.Generator, compiled: bool, reps: int) -> dict[str, float]:
    reference, backend = get_backend("reference"), get_backend("onednn")
    x = torch.randn(m, k, generator=generator) * 1.5 + 0.2
    scale = ((x.max() - x.min()) / 255).reshape(1)
    grid = ActivationGrid(scale, (torch.round(-x.min() / scale) + 0.37).reshape(1), 8)
    bias = torch.randn(n, generator=generator) * 0.1
    w4, w8 = packed_weight(n, k, 4, generator), packed_weight(n, k, 8, generator)
    dense = reference.prepare_weight(w4, torch.float32)
    dense_bf16, x_bf16, bias_bf16 = dense.bfloat16(), x.bfloat16(), bias.bfloat16()
    prepared4, prepared8 = backend.prepare_weight(w4, torch.float32), backend.prepare_weight(w8, torch.float32)

    def onednn_compiled():
        onednn.COMPILE_QUANTIZE = True
        try:
            return backend.linear(x, prepared4, bias, grid)
        finally:
            onednn.COMPILE_QUANTIZE = False

    fns = {
        "fp32": lambda: F.linear(x, dense, bias),
        "bf16": lambda: F.linear(x_bf16, dense_bf16, bias_bf16),
        "reference": lambda: reference.linear(x, dense, bias, grid),
        "onednn_w4": lambda: backend.linear(x, prepared4, bias, grid),
        "onednn_w8": lambda: backend.linear(x, prepared8, bias, grid),
    }
    if compiled:
        fns["onednn_w4c"] = onednn_compiled
    return bench(fns, reps or (7 if m > 1000 else 25), 1 if m > 1000 else 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled input quantization column")
    parser.add_argument("--reps", type=int, default=0, help="repeats (default: 7 for M=6304, 25 for M=197)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not get_backend("onednn").is_available(torch.device("cpu")):
        raise SystemExit("the oneDNN backend is not available on this machine (needs VNNI or AMX)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    generator = torch.Generator().manual_seed(0)
    for m in (6304, 197):
        totals: dict[str, float] = {}
        for k, n in SHAPES:
            result = time_shape(m, k, n, generator, not args.no_compile, args.reps)
            for name, t in result.items():
                totals[name] = totals.get(name, 0.0) + t
            print(f"M={m:5d} K={k:4d} N={n:4d}  " + "  ".join(
                f"{name} {t * 1e3:.2f}ms ({t / result['fp32']:.2f}x)" for name, t in result.items()), flush=True)
        print(f"  sum of the 4 linears, M={m}:")
        for name, t in totals.items():
            print(f"    {name:11s} {t * 1e3:8.2f} ms   {t / totals['fp32']:.2f}x fp32   {t / totals['bf16']:.2f}x bf16")


if __name__ == "__main__":
    main()
