"""`optimum-lrpq quantize`: quantize a model and save it with its image processor, model card and bits plot.

The quantization settings are `LRPQConfig` fields: from `--config FILE` (a JSON object of fields), overridden by the
flags given on the command line (`--weight-bits`, `--allocation`, ...). A flag left out keeps the file's value, or
LRPQConfig's default.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any

from ..options import ALLOCATIONS, RECONSTRUCTIONS, RELEVANCE_TARGETS, WEIGHT_ROUNDINGS
from .common import (
    DEMO_BASE_MODEL,
    CLIError,
    add_dataset_arguments,
    add_device_argument,
    add_label_names_argument,
    add_quiet_argument,
    check_output,
    keep_label_ids,
    load_dataset_split,
    load_model,
    load_processor,
    one_line,
    progress_disabled,
    quantize_model,
    resolve_columns,
    resolve_device,
    staged_output,
    write_quantized,
)

# Flag destination -> LRPQConfig field, for the flags that set a field (None: the flag was not given).
FLAG_FIELDS = {
    "weight_bits": "weight_bits",
    "activation_bits": "activation_bits",
    "mixed_precision": "mixed_precision",
    "uniform_fallback": "uniform_fallback",
    "num_samples": "num_calibration_samples",
    "relevance_target": "relevance_target",
    "allocation": "allocation",
    "weight_rounding": "weight_rounding",
    "reconstruction": "reconstruction",
    "reconstruction_steps": "reconstruction_steps",
    "calibration_batch_size": "calibration_batch_size",
}
# LRPQConfig fields the quantizer writes into a quantized model's config: not options.
RECORDED_FIELDS = ("layer_bits", "relevance", "format_version", "lrpq_version")


def add_parser(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser(
        "quantize", help="quantize a model and save it (model, image processor, model card, bits plot)",
        description="Quantize an image-classification model with LRP-QViT and save it with its image processor, a "
        "model card (README.md) and a plot of relevance and bits per layer (lrpq_bits.png). Settings: the "
        "LRPQConfig fields of --config FILE, overridden by the flags given.",
    )
    q.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hub model id or local directory (default: the demo MNIST ViT shipped with optimum-lrpq)")
    add_dataset_arguments(q, "split used for calibration (default: 'train', or the only split)",
                          "label column; only read with --relevance-target label")
    q.add_argument("--config", metavar="FILE",
                   help="JSON object of LRPQConfig fields, e.g. {\"weight_bits\": 4, \"clipping\": \"ccq_b\"}; the "
                   "flags below override it. calibration_dataset / calibration_split / calibration_image_column "
                   "stand for --dataset / --split / --image-column when those are not given")
    q.add_argument("--num-samples", type=int, metavar="N",
                   help="calibration images (num_calibration_samples; default: 32)")
    q.add_argument("--weight-bits", type=int, metavar="B",
                   help="weight bits, 2-8; the average budget with --mixed-precision (default: 4)")
    q.add_argument("--activation-bits", type=int, metavar="B",
                   help="activation bits, 2-8; the average budget with --mixed-precision (default: 4)")
    q.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="choose bits per layer from LRP relevance under the budgets above (default: off)")
    q.add_argument("--uniform-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="with --mixed-precision: keep uniform bits when they measure closer to the float model on "
                   "the calibration images than the allocation (default: on)")
    q.add_argument("--allocation", choices=ALLOCATIONS,
                   help="how mixed precision picks the bits: LRP relevance (lrp, the method), relevance times "
                   "measured sensitivity (lrp_sensitivity), or a baseline (default: lrp)")
    q.add_argument("--relevance-target", choices=RELEVANCE_TARGETS,
                   help="start LRP at the predicted class or at the label (default: predicted)")
    q.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS,
                   help="gptq: round with error compensation on the calibration inputs; nearest: round to the "
                   "nearest level (default: gptq)")
    q.add_argument("--reconstruction", choices=RECONSTRUCTIONS,
                   help="block: after calibration, learn each transformer block's weight rounding and activation "
                   "steps to reproduce the float block's output (slower; default: off)")
    q.add_argument("--reconstruction-steps", type=int, metavar="N",
                   help="optimisation steps per block with --reconstruction (default: 500)")
    q.add_argument("--calibration-batch-size", type=int, metavar="N",
                   help="images per calibration forward pass (default: 8)")
    add_device_argument(q, "quantize")
    add_label_names_argument(q)
    q.add_argument("--output", "-o", required=True, metavar="DIR", help="where to write the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    q.add_argument("--push-to-hub", metavar="REPO", help="also upload DIR to this Hub repository (e.g. me/vit-lrpq)")
    q.add_argument("--private", action="store_true", help="create the Hub repository as private")
    add_quiet_argument(q)
    q.set_defaults(func=run)
    return q


def config_fields() -> list[str]:
    """The LRPQConfig fields a user may set (its constructor's parameters, less those the quantizer records)."""
    import inspect

    from ..configuration import LRPQConfig

    parameters = inspect.signature(LRPQConfig.__init__).parameters.values()
    return [p.name for p in parameters
            if p.name != "self" and p.kind is not p.VAR_KEYWORD and p.name not in RECORDED_FIELDS]


def read_config_file(path: str) -> dict[str, Any]:
    """The LRPQConfig fields of the JSON file `path`, checked: unknown fields, recorded fields and invalid values
    are one-line `CLIError`s naming the field."""
    from ..configuration import QUANT_METHOD, LRPQConfig

    where = f"--config {path}"
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            fields = json.load(file)
    except FileNotFoundError as err:
        raise CLIError(f"{where}: no such file.") from err
    except IsADirectoryError as err:
        raise CLIError(f"{where}: is a directory; pass a JSON file of LRPQConfig fields.") from err
    except json.JSONDecodeError as err:
        raise CLIError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{where}: cannot be read ({one_line(err)}).") from err
    if not isinstance(fields, dict):
        raise CLIError(f"{where}: expected a JSON object of LRPQConfig fields, e.g. "
                       f'{{"weight_bits": 4, "mixed_precision": true}}, got a JSON {type(fields).__name__}.')
    method = fields.pop("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise CLIError(f"{where}: quant_method is {method!r}; this file must describe an {QUANT_METHOD!r} "
                       "quantization (or leave quant_method out).")
    known = config_fields()
    for name in fields:
        if name in RECORDED_FIELDS:
            raise CLIError(f"{where}: field {name!r} is written by the quantizer, not a setting; remove it.")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CLIError(f"{where}: unknown field {name!r}{hint}; LRPQConfig fields: {', '.join(known)}.")
    try:
        LRPQConfig(**fields)
    except ValueError as err:
        raise CLIError(f"{where}: {one_line(err)}") from err
    return fields


def build_config(args) -> tuple[Any, dict[str, Any]]:
    """(the LRPQConfig of the run: the file's fields overridden by the flags given, the file's fields)."""
    from ..configuration import LRPQConfig

    fields = read_config_file(args.config) if args.config else {}
    flags = {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items() if getattr(args, dest) is not None}
    for dest in ("num_samples", "calibration_batch_size"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise CLIError(f"--{dest.replace('_', '-')} must be at least 1.")
    try:
        return LRPQConfig(**{**fields, **flags}), fields
    except ValueError as err:
        raise CLIError(err) from err


def run(args) -> int:
    check_output(args.output, args.overwrite)
    config, fields = build_config(args)
    device = resolve_device(args.device)
    show_progress = not progress_disabled(args.quiet)
    from ..data.loading import materialize
    from ..integration.hub import upload_failure_message, upload_model_folder
    from ..reporting.summary import bits_summary

    # The file's calibration_* fields stand for the dataset options not given.
    dataset_name = args.dataset or fields.get("calibration_dataset")
    split = args.split or fields.get("calibration_split")
    num_samples = config.num_calibration_samples
    dataset, description = load_dataset_split(dataset_name, split, ("train",), num_samples)
    need_label = config.relevance_target == "label"
    image_column, label_column = resolve_columns(dataset, args.image_column or fields.get("calibration_image_column"),
                                                 args.label_column, need_label)
    if need_label and args.ignore_label_names:
        dataset = keep_label_ids(dataset, label_column)
    if need_label and label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    dataset = materialize(dataset)
    model = load_model(args.model).to(device)
    processor = load_processor(args.model, required=image_column != "pixel_values")
    model = quantize_model(model, config, dataset, processor, image_column, show_progress=show_progress)
    with staged_output(args.output, args.overwrite) as staging:
        write_quantized(model, processor, staging, base_model=args.model or DEMO_BASE_MODEL, calibration=description,
                        repo_id=args.push_to_hub)
    summary = bits_summary(model)
    layers = sum(1 for e in model.config.quantization_config.layer_bits.values() if "weight" in e)
    print(f"Quantized {layers} weight layers of {type(model).__name__} on {min(num_samples, len(dataset))} "
          f"images of {description}: {summary['weight_bits']:.2f} average weight bits, "
          f"{summary['activation_bits']:.2f} average activation bits.")
    print(f"Wrote {args.output}: {', '.join(sorted(os.listdir(args.output)))}")
    if args.push_to_hub:
        try:
            url = upload_model_folder(args.output, args.push_to_hub, private=args.private or None)
        except Exception as err:
            raise CLIError(upload_failure_message(args.output, args.push_to_hub, err)) from err
        print(f"Pushed to {args.push_to_hub}: {url}")
    return 0
