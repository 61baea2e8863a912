"""Cost of the relevance pass relative to one float forward pass over the calibration images.

As the pipeline does it: the float forward runs over all ``--images`` calibration images, the relevance pass
(``compute_relevance``) over the first ``--relevance-images`` of them (LRPQConfig's ``num_relevance_samples``), both
in micro-batches of ``--batch-size``. Each is timed ``--repeats`` times, alternated after one warm-up each so that
both see the same machine load; prints the medians, the median of the paired ratios, the relevance cost per image
(relative to the forward per image) and the peak resident memory of the process after the forward alone and after
the relevance runs (``resource.getrusage``; a high-water mark, so the second figure includes the first).

    python benchmarks/relevance_cost.py                          # ViT-Base-sized (random weights), 32 images, 2 threads
    python benchmarks/relevance_cost.py --model vit-large --repeats 1
    python benchmarks/relevance_cost.py --images 8 --relevance-images 8 --rule epsilon --score weight
    python benchmarks/relevance_cost.py --profile                # torch.profiler table of one relevance pass
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

from optimum_lrpq import LRPQConfig
from optimum_lrpq.relevance import RULES, SCORES, compute_relevance


def build(name: str) -> torch.nn.Module:
    if name == "vit-base":
        return ViTForImageClassification(ViTConfig()).eval()  # ViT-Base: 224 px, 16 px patches, 768 wide, 12 layers
    if name == "vit-large":
        return ViTForImageClassification(ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                   intermediate_size=4096)).eval()
    if name == "dinov2-small":
        return Dinov2ForImageClassification(Dinov2Config(image_size=224, patch_size=14, hidden_size=384,
                                                         num_attention_heads=6, num_labels=1000)).eval()
    raise ValueError(name)


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def paired_times(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of ``first`` and ``second``, alternated (after one warm-up each) so that both see the same load."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-base", choices=("vit-base", "vit-large", "dinov2-small"))
    parser.add_argument("--images", type=int, default=32, help="calibration images (the float forward's)")
    parser.add_argument("--relevance-images", type=int, default=LRPQConfig().num_relevance_samples,
                        help="images of the relevance pass (default: LRPQConfig.num_relevance_samples)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rule", default="chefer", choices=RULES)
    parser.add_argument("--score", default=LRPQConfig().relevance_score, choices=SCORES)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one relevance pass")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.model)
    size = model.config.image_size
    pixel_values = torch.randn(args.images, 3, size, size)
    batches = list(pixel_values.split(args.batch_size))
    relevance_images = min(args.relevance_images, args.images)
    relevance_batches = list(pixel_values[:relevance_images].split(args.batch_size))

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(pixel_values=batch)

    def relevance() -> None:
        compute_relevance(model, relevance_batches, rule=args.rule, score=args.score)

    if args.profile:
        relevance()  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            relevance()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    forward()
    forward_rss = peak_rss_mib()  # before any relevance pass: the forward's own high-water mark
    forward_times, relevance_times = paired_times(forward, relevance, args.repeats)
    relevance_rss = peak_rss_mib()
    forward_s, relevance_s = statistics.median(forward_times), statistics.median(relevance_times)
    print(f"model {args.model}, {size} px, forward over {args.images} images, relevance over the first "
          f"{relevance_images}, batches of {args.batch_size}, {args.threads} threads, rule={args.rule}, "
          f"score={args.score}, median of {args.repeats}")
    print(f"forward (no_grad)    {forward_s * 1000:9.1f} ms   peak RSS {forward_rss:8.0f} MiB")
    print(f"compute_relevance    {relevance_s * 1000:9.1f} ms   peak RSS {relevance_rss:8.0f} MiB")
    paired = statistics.median(r / f for f, r in zip(forward_times, relevance_times, strict=True))
    print(f"ratio relevance pass / forward over the calibration images: {relevance_s / forward_s:.2f}x "
          f"(median of paired ratios {paired:.2f}x)")
    per_image = paired * args.images / relevance_images
    print(f"per image: relevance costs {per_image:.2f}x a forward")


if __name__ == "__main__":
    main()
