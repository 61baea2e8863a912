"""`optimum-lrpq quantize`: quantize a model and save it with its image processor, model card and bits plot."""

from __future__ import annotations

import argparse
import os

from .common import (
    DEMO_BASE_MODEL,
    CLIError,
    add_dataset_arguments,
    check_output,
    load_dataset_split,
    load_model,
    load_processor,
    one_line,
    quantize_model,
    resolve_columns,
    staged_output,
    write_quantized,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser(
        "quantize", help="quantize a model and save it (model, image processor, model card, bits plot)",
        description="Quantize an image-classification model with LRP-QViT and save it with its image processor, a "
        "model card (README.md) and a plot of relevance and bits per layer (lrpq_bits.png).",
    )
    q.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hub model id or local directory (default: the demo MNIST ViT shipped with optimum-lrpq)")
    add_dataset_arguments(q, "split used for calibration (default: 'train', or the only split)",
                          "label column; only read with --relevance-target label")
    q.add_argument("--num-samples", type=int, default=32, metavar="N",
                   help="calibration images (default: %(default)s)")
    q.add_argument("--weight-bits", type=int, default=4, metavar="B",
                   help="weight bits, 2-8; the average budget with --mixed-precision (default: %(default)s)")
    q.add_argument("--activation-bits", type=int, default=4, metavar="B",
                   help="activation bits, 2-8; the average budget with --mixed-precision (default: %(default)s)")
    q.add_argument("--mixed-precision", action="store_true",
                   help="choose bits per layer from LRP relevance under the budgets above")
    q.add_argument("--relevance-target", choices=("predicted", "label"), default="predicted",
                   help="start LRP at the predicted class or at the label (default: %(default)s)")
    q.add_argument("--output", "-o", required=True, metavar="DIR", help="where to write the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    q.add_argument("--push-to-hub", metavar="REPO", help="also upload DIR to this Hub repository (e.g. me/vit-lrpq)")
    q.add_argument("--private", action="store_true", help="create the Hub repository as private")
    q.set_defaults(func=run)
    return q


def run(args) -> int:
    check_output(args.output, args.overwrite)
    if args.num_samples < 1:
        raise CLIError("--num-samples must be at least 1.")
    from .. import LRPQConfig
    from ..data.loading import materialize
    from ..integration.hub import upload_model_folder
    from ..reporting.summary import bits_summary

    try:
        config = LRPQConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                            mixed_precision=args.mixed_precision, num_calibration_samples=args.num_samples,
                            relevance_target=args.relevance_target)
    except ValueError as err:
        raise CLIError(err) from err
    dataset, description = load_dataset_split(args.dataset, args.split, ("train",), args.num_samples)
    need_label = args.relevance_target == "label"
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column, need_label)
    if need_label and label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    dataset = materialize(dataset)
    model = load_model(args.model)
    processor = load_processor(args.model, required=image_column != "pixel_values")
    model = quantize_model(model, config, dataset, processor, image_column)
    with staged_output(args.output, args.overwrite) as staging:
        write_quantized(model, processor, staging, base_model=args.model or DEMO_BASE_MODEL, calibration=description,
                        repo_id=args.push_to_hub)
    summary = bits_summary(model)
    layers = sum(1 for e in model.config.quantization_config.layer_bits.values() if "weight" in e)
    print(f"Quantized {layers} weight layers of {type(model).__name__} on {min(args.num_samples, len(dataset))} "
          f"images of {description}: {summary['weight_bits']:.2f} average weight bits, "
          f"{summary['activation_bits']:.2f} average activation bits.")
    print(f"Wrote {args.output}: {', '.join(sorted(os.listdir(args.output)))}")
    if args.push_to_hub:
        try:
            url = upload_model_folder(args.output, args.push_to_hub, private=args.private or None)
        except Exception as err:
            raise CLIError(f"Saved {args.output}, but uploading it to {args.push_to_hub} failed: {one_line(err)}") from err
        print(f"Pushed to {args.push_to_hub}: {url}")
    return 0
