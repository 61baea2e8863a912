"""`optimum-lrpq evaluate`: top-1 accuracy and throughput of a model, optionally next to its float baseline."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    add_dataset_arguments,
    add_device_argument,
    add_label_names_argument,
    add_quiet_argument,
    average_bits,
    demo_model_dir,
    format_percent,
    format_size,
    format_table,
    keep_label_ids,
    label_names_error,
    load_dataset_split,
    load_model,
    load_processor,
    progress_disabled,
    resolve_columns,
    resolve_device,
    weights_size,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser(
        "evaluate", help="top-1 accuracy and throughput, optionally next to the float model",
        description="Evaluate an image classifier (quantized or not): top-1 accuracy and throughput (images/s of the "
        "model's forward passes). With --baseline, the float model is evaluated on the same images and shown side "
        "by side. When the dataset names its classes (an image folder's class folders, a ClassLabel column) and the "
        "model names its labels (id2label), the names decide which class is which; names that are not the model's "
        "labels are refused (see --ignore-label-names).",
    )
    e.add_argument("model", nargs="?", metavar="MODEL_OR_DIR",
                   help="Hub model id or local directory (default: the demo MNIST ViT)")
    add_dataset_arguments(e, "split to evaluate (default: 'validation', else 'test', or the only split)",
                          "column holding the class ids (default: 'label'/'labels', or the ClassLabel column)")
    e.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: %(default)s")
    e.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    e.add_argument("--baseline", metavar="MODEL", help="float model (Hub id or directory) to compare with")
    add_device_argument(e, "run the models")
    add_label_names_argument(e)
    add_quiet_argument(e)
    e.set_defaults(func=run)
    return e


def _evaluate_row(label, model, dataset, processor, args, directory):
    from ..data.labels import LabelMismatchError
    from ..metrics.classification import evaluate_classifier

    try:
        result = evaluate_classifier(model, dataset, image_processor=processor, image_column=args.image_column,
                                     label_column=args.label_column, batch_size=args.batch_size, limit=args.limit,
                                     show_progress=not progress_disabled(args.quiet), desc=f"Evaluating {label}")
    except LabelMismatchError as err:
        raise label_names_error(err) from err
    except ValueError as err:
        raise CLIError(err) from err
    w, a = average_bits(model)
    return result, [label, format_percent(result["accuracy"]), f"{result['images_per_second']:.1f}",
                    format_size(weights_size(model, directory)), w, a]


def run(args) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--batch-size and --limit must be at least 1.")
    device = resolve_device(args.device)
    dataset, description = load_dataset_split(args.dataset, args.split, ("validation", "test"), args.limit)
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column, need_label=True)
    if args.ignore_label_names:
        dataset = keep_label_ids(dataset, label_column)
    raw = image_column != "pixel_values"
    model = load_model(args.model).to(device)
    processor = load_processor(args.model, required=False) if raw else None
    baseline = load_model(args.baseline).to(device) if args.baseline else None
    if raw and processor is None and args.baseline:
        processor = load_processor(args.baseline, required=False)
    if raw and processor is None:
        load_processor(args.model)  # raises the explanatory error
    name = args.model or "demo MNIST ViT"
    rows, results = [], []
    if baseline is not None:
        result, row = _evaluate_row(f"{args.baseline} (baseline)", baseline, dataset, processor, args, args.baseline)
        rows.append(row)
        results.append(result)
    result, row = _evaluate_row(name, model, dataset, processor, args, args.model or demo_model_dir())
    rows.append(row)
    results.append(result)
    headers = ["model", "top-1", "images/s", "weights", "avg W bits", "avg A bits"]
    if baseline is not None:
        headers.insert(2, "drop")
        rows[0].insert(2, "-")
        rows[1].insert(2, f"{100 * (results[0]['accuracy'] - results[1]['accuracy']):.2f} pt")
    print(f"{results[-1]['num_images']} images of {description}")
    print(format_table(headers, rows))
    return 0
