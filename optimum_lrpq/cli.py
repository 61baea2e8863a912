"""`optimum-lrpq`: quantize, evaluate and inspect vision transformers with LRP-QViT from the command line.

    optimum-lrpq                      # = optimum-lrpq demo: quantize the shipped MNIST ViT, offline, in seconds
    optimum-lrpq quantize facebook/deit-small-patch16-224 --dataset imagenet-1k --split train \\
        --weight-bits 4 --activation-bits 4 --mixed-precision --output deit-s-lrpq
    optimum-lrpq evaluate deit-s-lrpq --dataset imagenet-1k --split validation --limit 1000 \\
        --baseline facebook/deit-small-patch16-224
    optimum-lrpq inspect deit-s-lrpq

Models are Hub ids or local directories; datasets are Hub names, local image folders or `save_to_disk`
directories. Errors are reported in one line with exit status 2. Output directories are written next to their
target under a temporary name and renamed into place at the end, so an interrupted run leaves nothing half written.

torch, transformers and datasets are imported inside the commands. The same commands are available as
`optimum-cli lrpq ...` (see `optimum/commands/register/lrpq.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from . import output_dir

PROG = "optimum-lrpq"
EXIT_ERROR = 2
COMMANDS = ("quantize", "evaluate", "inspect", "demo")
DEFAULT_DEMO_OUTPUT = "lrpq-demo"
DEMO_BASE_MODEL = "optimum-lrpq demo ViT (MNIST)"


class CLIError(Exception):
    """An error reported to the user in one line (no traceback), exit status 2."""


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


# ------------------------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------------------------


def _add_dataset_arguments(parser: argparse.ArgumentParser, split_help: str, label_help: str) -> None:
    parser.add_argument(
        "--dataset", metavar="NAME_OR_DIR",
        help="Hub dataset name (streamed), local image folder (root/<split>/<class>/*.png) or a directory written by "
        "Dataset.save_to_disk. Default: the MNIST digits shipped with optimum-lrpq (demo data).",
    )
    parser.add_argument("--split", help=split_help)
    parser.add_argument("--image-column", metavar="NAME",
                        help="column holding the images (default: the Image-typed column, or 'image'/'img')")
    parser.add_argument("--label-column", metavar="NAME", help=label_help)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-training quantization of Hugging Face vision transformers (ViT, DeiT, Swin, DINOv2) with "
        "LRP-QViT: LRP relevance decides which layers get more bits. Without a command, runs the offline demo.",
        epilog=f"Run '{prog} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"optimum-lrpq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    q = commands.add_parser(
        "quantize", help="quantize a model and save it (model, image processor, model card, bits plot)",
        description="Quantize an image-classification model with LRP-QViT and save it with its image processor, a "
        "model card (README.md) and a plot of relevance and bits per layer (lrpq_bits.png).",
    )
    q.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hub model id or local directory (default: the demo MNIST ViT shipped with optimum-lrpq)")
    _add_dataset_arguments(q, "split used for calibration (default: 'train', or the only split)",
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
    q.set_defaults(func=_cmd_quantize)

    e = commands.add_parser(
        "evaluate", help="top-1 accuracy and throughput, optionally next to the float model",
        description="Evaluate an image classifier (quantized or not): top-1 accuracy and throughput (images/s of the "
        "model's forward passes). With --baseline, the float model is evaluated on the same images and shown side "
        "by side.",
    )
    e.add_argument("model", nargs="?", metavar="MODEL_OR_DIR",
                   help="Hub model id or local directory (default: the demo MNIST ViT)")
    _add_dataset_arguments(e, "split to evaluate (default: 'validation', else 'test', or the only split)",
                           "column holding the class ids (default: 'label'/'labels', or the ClassLabel column)")
    e.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: %(default)s")
    e.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    e.add_argument("--baseline", metavar="MODEL", help="float model (Hub id or directory) to compare with")
    e.add_argument("--device", default="cpu", help="device to run the models on, e.g. cuda (default: %(default)s)")
    e.set_defaults(func=_cmd_evaluate)

    i = commands.add_parser(
        "inspect", help="print the per-layer bits and relevance of a quantized model and plot them",
        description="Print the bits (weights, input activations) and LRP relevance of every layer of an "
        "lrpq-quantized model, their averages, and write the plot.",
    )
    i.add_argument("model", metavar="DIR", help="quantized model directory (or Hub id)")
    i.add_argument("--plot", metavar="PNG", help="where to write the plot (default: DIR/lrpq_bits.png)")
    i.set_defaults(func=_cmd_inspect)

    d = commands.add_parser(
        "demo", help="quantize the shipped MNIST ViT at W4/A4 mixed precision and compare (offline, seconds)",
        description="Quantize the small ViT shipped with optimum-lrpq (trained by the project on real MNIST digits) "
        "at W4/A4 mixed precision, evaluate float vs quantized on 500 shipped held-out digits, print the table and "
        "write the quantized model, its model card and the bits plot to --output. Needs no network.",
    )
    d.add_argument("--output", "-o", default=DEFAULT_DEMO_OUTPUT, metavar="DIR", help="default: ./%(default)s")
    d.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of `optimum-lrpq`; returns the exit status (0, or 2 for a reported error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # no command: the demo (options such as --output go to it)
    args = build_parser(prog).parse_args(argv)
    try:
        with _quiet_libraries():
            return args.func(args) or 0
    except CLIError as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _quiet_libraries():
    """transformers/datasets warnings off while a command runs. huggingface_hub keeps its retry warnings (an
    unreachable Hub takes ~30 s of retries), and progress bars stay (downloads, loading large models)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("transformers", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ------------------------------------------------------------------------------------------------------------------
# helpers: output directory, models, datasets, tables
# ------------------------------------------------------------------------------------------------------------------


def check_output(path: str, overwrite: bool) -> str:
    try:
        return output_dir.check_output(path, overwrite)
    except output_dir.OutputExistsError as err:
        raise CLIError(str(err)) from err


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool):
    """`output_dir.staged_output` with its errors reported as one-line CLI errors."""
    try:
        with output_dir.staged_output(path, overwrite) as staging:
            yield staging
    except output_dir.OutputExistsError as err:
        raise CLIError(str(err)) from err


def _demo_model_dir() -> str:
    from .demo import MODEL_DIR

    return MODEL_DIR


def load_model(name: str | None):
    """`AutoModelForImageClassification.from_pretrained(name)`, with load failures as one-line `CLIError`s."""
    from transformers import AutoModelForImageClassification

    name = name or _demo_model_dir()
    try:
        return AutoModelForImageClassification.from_pretrained(name)
    except Exception as err:
        raise CLIError(_model_error(name, err)) from err


def _model_error(name: str, err: BaseException) -> str:
    detail = _one_line(err).split(". ")[0]
    if os.path.isdir(name):
        return f"Could not load the model in directory {name}: {detail}."
    if name.startswith((".", "/", "~")) or os.path.exists(name):
        return f"The model directory {name} does not exist."
    return (
        f"The model {name!r} is not a local directory and the Hugging Face Hub is unreachable from here or has no such "
        f"model ({detail}). Point MODEL at a local directory saved with save_pretrained() (download it where the Hub "
        f"is reachable, e.g. `hf download {name} --local-dir DIR`); set HF_HUB_OFFLINE=1 to skip the connection "
        "retries."
    )


def load_processor(name: str | None, required: bool = True):
    """The model's image processor, or None when it has none and `required` is False."""
    from transformers import AutoImageProcessor

    name = name or _demo_model_dir()
    try:
        return AutoImageProcessor.from_pretrained(name)
    except Exception as err:
        if not required:
            return None
        raise CLIError(
            f"Could not load the image processor of {name} ({_one_line(err).split('. ')[0]}); the dataset holds raw "
            "images, so the model directory needs its preprocessor_config.json."
        ) from err


def load_dataset_split(name: str | None, split: str | None, prefer: tuple[str, ...], num_samples: int | None = None):
    """(dataset, description) of one split; `name=None` is the shipped demo digits."""
    from .datasets_io import DatasetLoadError, load_image_dataset, pick_split

    try:
        if name is None:
            from .demo import DATASET_NAME, load_digits

            digits = load_digits()
            chosen = pick_split(list(digits), split, prefer, "of demo digits")
            dataset = digits[chosen]
            if num_samples is not None:
                dataset = dataset.select(range(min(num_samples, len(dataset))))
            return dataset, f"{DATASET_NAME} ({chosen})"
        dataset = load_image_dataset(name, split, num_samples=num_samples, prefer=prefer)
        return dataset, f"{name} ({getattr(dataset, 'split', None) or split or prefer[0]})"
    except DatasetLoadError as err:
        raise CLIError(err) from err


def resolve_columns(dataset, image_column, label_column, need_label):
    from .datasets_io import DatasetLoadError
    from .datasets_io import resolve_columns as resolve

    try:
        return resolve(dataset, image_column, label_column, need_label=need_label)
    except DatasetLoadError as err:
        raise CLIError(err) from err


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Plain-text table; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *[line(r) for r in cells[1:]]])


def _size(num_bytes: float) -> str:
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KB", "MB"):
        num_bytes /= 1024
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1024:.1f} GB"


def weights_size(model, directory: str | None = None) -> int:
    """Bytes of the safetensors files in `directory` if given and present, else of the model's state dict."""
    if directory and os.path.isdir(directory):
        files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
        if files:
            return sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _is_quantized(model_or_config) -> bool:
    """lrpq-quantized model, or config of one (a bare `AutoConfig` keeps `quantization_config` as a dict)."""
    quantization = getattr(getattr(model_or_config, "config", model_or_config), "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return method == "lrpq"


def _bits(model) -> tuple[str, str]:
    if _is_quantized(model):
        from .model_card import bits_summary

        summary = bits_summary(model)
        return f"{summary['weight_bits']:.2f}", f"{summary['activation_bits']:.2f}"
    bits = str(next(model.parameters()).element_size() * 8)
    return bits, bits


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def write_quantized(model, processor, directory: str, *, base_model: str | None, accuracy=None,
                    calibration: str | None = None, repo_id: str | None = None) -> None:
    """Model, image processor, bits plot and model card into `directory`."""
    from .model_card import PLOT_NAME, write_model_card
    from .visualization import plot_bits_and_relevance

    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    qc = model.config.quantization_config
    plot_bits_and_relevance(qc.layer_bits, qc.relevance, os.path.join(directory, PLOT_NAME),
                            order=[name for name, _ in model.named_modules()])
    write_model_card(model, directory, base_model=base_model, accuracy=accuracy, calibration=calibration,
                     repo_id=repo_id)


def _quantize(model, config, dataset, processor, image_column, show_progress=True):
    from . import LRPQuantizer

    try:
        return LRPQuantizer(config).quantize_model(model, dataset, image_processor=processor,
                                                   image_column=image_column, show_progress=show_progress)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CLIError(err) from err


# ------------------------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------------------------


def _cmd_quantize(args) -> int:
    check_output(args.output, args.overwrite)
    if args.num_samples < 1:
        raise CLIError("--num-samples must be at least 1.")
    from . import LRPQConfig
    from .datasets_io import materialize
    from .model_card import bits_summary, upload_model_folder

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
    model = _quantize(model, config, dataset, processor, image_column)
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
            raise CLIError(f"Saved {args.output}, but uploading it to {args.push_to_hub} failed: {_one_line(err)}") from err
        print(f"Pushed to {args.push_to_hub}: {url}")
    return 0


def _evaluate_row(label, model, dataset, processor, args, directory):
    from .metrics.classification import evaluate_classifier

    try:
        result = evaluate_classifier(model, dataset, image_processor=processor, image_column=args.image_column,
                                     label_column=args.label_column, batch_size=args.batch_size, limit=args.limit,
                                     desc=f"Evaluating {label}")
    except ValueError as err:
        raise CLIError(err) from err
    w, a = _bits(model)
    return result, [label, _percent(result["accuracy"]), f"{result['images_per_second']:.1f}",
                    _size(weights_size(model, directory)), w, a]


def _cmd_evaluate(args) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--batch-size and --limit must be at least 1.")
    dataset, description = load_dataset_split(args.dataset, args.split, ("validation", "test"), args.limit)
    image_column, _ = resolve_columns(dataset, args.image_column, args.label_column, need_label=True)
    raw = image_column != "pixel_values"
    model = load_model(args.model).to(args.device)
    processor = load_processor(args.model, required=False) if raw else None
    baseline = load_model(args.baseline).to(args.device) if args.baseline else None
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
    result, row = _evaluate_row(name, model, dataset, processor, args, args.model or _demo_model_dir())
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


def _cmd_inspect(args) -> int:
    from transformers import AutoConfig

    from .model_card import PLOT_NAME, bits_summary, is_hub_id
    from .visualization import ordered_layer_names, plot_bits_and_relevance, weight_layer_names

    try:
        quantized = _is_quantized(AutoConfig.from_pretrained(args.model))  # before loading any weights
    except Exception as err:
        raise CLIError(_model_error(args.model, err)) from err
    if not quantized:
        raise CLIError(f"{args.model} is not an lrpq-quantized model (its config.json has no lrpq quantization_config).")
    model = load_model(args.model)
    qc = model.config.quantization_config
    relevance = qc.relevance or {}
    order = [name for name, _ in model.named_modules()]
    rows = [[name, qc.layer_bits[name]["weight"], qc.layer_bits[name].get("activation", "-"),
             f"{relevance[name]:.4f}" if name in relevance else "-"] for name in weight_layer_names(qc.layer_bits, order)]
    mode = "mixed precision" if qc.mixed_precision else "uniform"
    print(f"{args.model}: {type(model).__name__}, LRP-QViT W{qc.weight_bits}/A{qc.activation_bits} {mode}")
    print(format_table(["layer", "W bits", "A bits", "relevance"], rows))
    shared = [[name, qc.layer_bits[name]["activation"]]
              for name in ordered_layer_names((n for n, e in qc.layer_bits.items() if "weight" not in e), order)]
    if shared:
        print()
        print(format_table(["shared activation quantizer", "A bits"], shared))
    summary = bits_summary(model)
    print(f"\naverage bits (patch embedding excluded): weights {summary['weight_bits']:.2f} (parameter-weighted), "
          f"activations {summary['activation_bits']:.2f} (MAC-weighted)")
    if args.plot:
        plot = args.plot
    elif os.path.isdir(args.model) and not is_hub_id(args.model):
        plot = os.path.join(args.model, PLOT_NAME)
    else:
        plot = PLOT_NAME
    plot_bits_and_relevance(qc.layer_bits, qc.relevance, plot, title=os.path.basename(os.path.normpath(args.model)),
                            order=order)
    print(f"plot: {plot}")
    return 0


def _cmd_demo(args) -> int:
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
    from . import LRPQConfig
    from .demo import DATASET_NAME, MODEL_DIR, load_digits
    from .metrics.classification import evaluate_classifier

    digits = load_digits()
    processor = load_processor(MODEL_DIR)
    float_model = load_model(MODEL_DIR)
    float_result = evaluate_classifier(float_model, digits["test"], image_processor=processor, batch_size=100,
                                       desc="Evaluating float")
    # All 64 shipped training digits: with 17 tokens per image, 32 would be too few tokens for per-channel ranges.
    config = LRPQConfig(weight_bits=4, activation_bits=4, mixed_precision=True,
                        num_calibration_samples=len(digits["train"]))
    qmodel = _quantize(load_model(MODEL_DIR), config, digits["train"], processor, "image")
    q_result = evaluate_classifier(qmodel, digits["test"], image_processor=processor, batch_size=100,
                                   desc="Evaluating quantized")
    accuracy = {"quantized": q_result["accuracy"], "float": float_result["accuracy"], "dataset": DATASET_NAME,
                "split": "test", "num_images": q_result["num_images"]}
    with staged_output(args.output, args.overwrite) as staging:
        write_quantized(qmodel, processor, staging, base_model=DEMO_BASE_MODEL, accuracy=accuracy,
                        calibration=f"the {len(digits['train'])} MNIST training digits shipped with optimum-lrpq")
    fw, fa = _bits(float_model)
    qw, qa = _bits(qmodel)
    rows = [
        ["float32", _percent(float_result["accuracy"]), "-", _size(weights_size(float_model, MODEL_DIR)), fw, fa],
        ["LRP-QViT W4/A4 mixed", _percent(q_result["accuracy"]),
         f"{100 * (float_result['accuracy'] - q_result['accuracy']):.2f} pt",
         _size(weights_size(qmodel, args.output)), qw, qa],
    ]
    calibrated = min(config.num_calibration_samples, len(digits["train"]))
    print(f"\noptimum-lrpq demo: ViT (4 layers, hidden 64, {sum(p.numel() for p in float_model.parameters())} "
          f"parameters) trained on real MNIST digits, quantized with LRP-QViT at W4/A4 mixed precision on "
          f"{calibrated} training digits, evaluated on {q_result['num_images']} held-out test digits.\n")
    print(format_table(["model", "top-1", "drop", "size on disk", "avg W bits", "avg A bits"], rows))
    print(f"\nWrote {args.output}: {', '.join(sorted(os.listdir(args.output)))}  ({time.perf_counter() - start:.1f} s)")
    print(f"Next: {PROG} inspect {args.output}   |   {PROG} evaluate {args.output} --baseline {MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
