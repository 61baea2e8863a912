"""Cost of the pipeline: stage times as multiples of one float forward pass, peak memory, latency, disk size.

    python benchmarks/cost.py --model base                       # ViT-Base-sized config, 32 images at 224 px
    python benchmarks/cost.py --model base --mixed-precision     # + LRP relevance and allocation
    python benchmarks/cost.py --model large --images 32          # ViT-Large-sized config
    python benchmarks/cost.py --model base --weight-rounding nearest   # without GPTQ

Weights are random (a config, not a checkpoint): costs do not depend on the weight values. Peak memory is the
largest resident set size sampled every 20 ms while a stage runs (process-wide, including the float model).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import psutil
import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.configuration import RANGE_METHODS

CONFIGS = {
    "tiny": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128},
    "base": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"image_size": 224, "patch_size": 16, "hidden_size": 1024, "num_hidden_layers": 24,
              "num_attention_heads": 16, "intermediate_size": 4096},
}


class PeakRSS:
    """Samples this process's resident memory in a background thread; `.peak` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@torch.no_grad()
def timed_forward(model, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        model(pixel_values=batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--range", choices=RANGE_METHODS, default=LRPQConfig().activation_range)
    parser.add_argument("--mlp-hidden-range", choices=RANGE_METHODS, default=LRPQConfig().mlp_hidden_range)
    parser.add_argument("--weight-rounding", choices=["gptq", "nearest"], default=LRPQConfig().weight_rounding)
    parser.add_argument("--relevance-samples", type=int, default=LRPQConfig().num_relevance_samples,
                        help="images of the relevance pass (default: LRPQConfig's)")
    args = parser.parse_args()
    logging.disable_progress_bar()

    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch threads: {torch.get_num_threads()}, cpu cores: {os.cpu_count()}")
    config = ViTConfig(**CONFIGS[args.model], num_labels=1000)
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    images = torch.randn(args.images, 3, config.image_size, config.image_size)
    batches = list(images.split(args.batch_size))
    print(f"model: ViT {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"{args.images} images at {config.image_size} px, batch {args.batch_size}")

    timed_forward(model, batches[:1])  # warm-up
    # Median of 3: one pass varies by 2x on a shared virtual machine.
    float_seconds = sorted(timed_forward(model, batches) for _ in range(3))[1]
    rss_before = psutil.Process().memory_info().rss

    quantizer = LRPQuantizer(LRPQConfig(
        weight_bits=args.bits, activation_bits=args.bits, mixed_precision=args.mixed_precision,
        weight_range=args.range, activation_range=args.range, num_calibration_samples=args.images,
        calibration_batch_size=args.batch_size, num_relevance_samples=args.relevance_samples,
        weight_rounding=args.weight_rounding, mlp_hidden_range=args.mlp_hidden_range,
    ))
    if args.mixed_precision:
        print(f"relevance on the first {min(args.relevance_samples, args.images)} of the {args.images} images")
    with PeakRSS() as peak:
        start = time.perf_counter()
        quantizer.quantize_model(model, images, show_progress=False)
        total = time.perf_counter() - start

    print(f"\n{'stage':<22}{'seconds':>10}{'x float forward':>17}")
    print(f"{'float forward (ref)':<22}{float_seconds:>10.2f}{1.0:>17.2f}   (median of 3)")
    for stage, seconds in quantizer.timings.items():
        print(f"{stage:<22}{seconds:>10.2f}{seconds / float_seconds:>17.2f}")
    print(f"{'quantize_model total':<22}{total:>10.2f}{total / float_seconds:>17.2f}")
    print(f"\npeak RSS during quantize_model: {peak.peak / 2**30:.2f} GiB "
          f"(before: {rss_before / 2**30:.2f} GiB, increase {(peak.peak - rss_before) / 2**30:.2f} GiB)")

    torch.manual_seed(0)
    reference = ViTForImageClassification(config).eval()
    timed_forward(model, batches[:1])
    quant_seconds = timed_forward(model, batches)
    float_again = timed_forward(reference, batches)
    print(f"inference over the {args.images} images: float {float_again:.2f} s, quantized (fake-quant) "
          f"{quant_seconds:.2f} s, ratio {quant_seconds / float_again:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(os.path.join(tmp, "fp"))
        model.save_pretrained(os.path.join(tmp, "q"))
        fp = os.path.getsize(os.path.join(tmp, "fp", "model.safetensors"))
        q = os.path.getsize(os.path.join(tmp, "q", "model.safetensors"))
    print(f"on disk: float32 {fp / 1e6:.1f} MB, lrpq {q / 1e6:.1f} MB, ratio {q / fp:.3f}")


if __name__ == "__main__":
    main()
