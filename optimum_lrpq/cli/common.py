"""What the commands share: the one-line `CLIError`, output directories, model / processor / dataset loaders, the
device and progress-bar options, the quantize-and-save step, and plain-text formatting (tables, sizes, percentages,
average bits).

torch, transformers and datasets are imported inside the functions, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

from ..integration import atomic

PROG = "optimum-lrpq"
EXIT_ERROR = 2
DEMO_BASE_MODEL = "optimum-lrpq demo ViT (MNIST)"


class CLIError(Exception):
    """An error reported to the user in one line (no traceback), exit status 2."""


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars (also when the environment variable TQDM_DISABLE is set to 1)")


def add_device_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help=f"device to {what} on: cpu, cuda, cuda:1, mps, ... (default: %(default)s)")


def add_label_names_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ignore-label-names", action="store_true",
        help="take the dataset's label ids as the model's ids even when its class names are not the model's labels "
        "(e.g. ImageNet synset folders n01440764, ... in the standard order); by default the names must match",
    )


def add_dataset_arguments(parser: argparse.ArgumentParser, split_help: str, label_help: str) -> None:
    parser.add_argument(
        "--dataset", metavar="NAME_OR_DIR",
        help="Hub dataset name (streamed), local image folder (root/<split>/<class>/*.png) or a directory written by "
        "Dataset.save_to_disk. Default: the MNIST digits shipped with optimum-lrpq (demo data).",
    )
    parser.add_argument("--split", help=split_help)
    parser.add_argument("--image-column", metavar="NAME",
                        help="column holding the images (default: the Image-typed column, or 'image'/'img')")
    parser.add_argument("--label-column", metavar="NAME", help=label_help)


# ------------------------------------------------------------------------------------------------------------------
# output directories
# ------------------------------------------------------------------------------------------------------------------


def check_output(path: str, overwrite: bool) -> str:
    try:
        return atomic.check_output(path, overwrite)
    except atomic.OutputExistsError as err:
        raise CLIError(str(err)) from err


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool):
    """`atomic.staged_output` with its errors reported as one-line CLI errors."""
    try:
        with atomic.staged_output(path, replace=True, overwrite=overwrite) as staging:
            yield staging
    except atomic.OutputExistsError as err:
        raise CLIError(str(err)) from err


def write_quantized(model, processor, directory: str, *, base_model: str | None, accuracy=None,
                    calibration: str | None = None, repo_id: str | None = None) -> None:
    """Model, image processor, bits plot and model card into `directory` (a staging directory)."""
    from ..integration.model_card import PLOT_NAME, write_model_card
    from ..reporting.plot import plot_bits_and_relevance

    # The class's save_pretrained: the instance's own (attached when the model was quantized) would stage the
    # directory once more and write a card without the accuracy and calibration, which the card below replaces.
    type(model).save_pretrained(model, directory)
    if processor is not None:
        processor.save_pretrained(directory)
    qc = model.config.quantization_config
    plot_bits_and_relevance(qc.layer_bits, qc.relevance, os.path.join(directory, PLOT_NAME),
                            order=[name for name, _ in model.named_modules()])
    # After the plot: the card links it when it is there.
    write_model_card(model, directory, base_model=base_model, accuracy=accuracy, calibration=calibration,
                     repo_id=repo_id)


# ------------------------------------------------------------------------------------------------------------------
# models, image processors, datasets, quantization
# ------------------------------------------------------------------------------------------------------------------


def demo_model_dir() -> str:
    from ..demo import MODEL_DIR

    return MODEL_DIR


def check_model_path(name: str) -> None:
    """Raise a `CLIError` at once when the model `name` looks like a local path (see
    `optimum_lrpq.data.loading.local_path_reason`) but is no directory, instead of looking it up on the Hub."""
    from ..data.loading import local_path_reason

    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise CLIError(f"The model {name} is a file; pass the directory saved with save_pretrained() that holds it.")
    reason = local_path_reason(name, image_folder_splits=False)
    if reason is not None:
        raise CLIError(f"No such directory: {name} ({os.path.abspath(path)}). The model was read as a local path "
                       f"because {reason}; check the path (a Hub model is named 'name' or 'owner/name').")


def check_quantized_model(name: str, fix: str = "") -> None:
    """Raise a `CLIError` unless the model `name` (a path or Hub id) is lrpq-quantized, read from its config alone
    (before any weights are loaded); `fix` ends the message (what to do instead)."""
    check_model_path(name)
    from transformers import AutoConfig

    from ..configuration import lrpq_config_of

    try:
        quantized = lrpq_config_of(AutoConfig.from_pretrained(name)) is not None
    except Exception as err:
        raise CLIError(model_error(name, err)) from err
    if not quantized:
        raise CLIError(f"{name} is not an lrpq-quantized model (its config.json has no lrpq quantization_config)"
                       + (f"; {fix}" if fix else "."))


def load_model(name: str | None):
    """`AutoModelForImageClassification.from_pretrained(name)`, with load failures as one-line `CLIError`s."""
    name = name or demo_model_dir()
    check_model_path(name)
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(name)
    except Exception as err:
        raise CLIError(model_error(name, err)) from err


def model_error(name: str, err: BaseException) -> str:
    """The one-line explanation of why the model `name` could not be loaded."""
    if os.path.isdir(name):  # the whole message: checkpoint errors end with the fix
        return f"Could not load the model in directory {name}: {one_line(err).rstrip('.')}."
    detail = one_line(err).split(". ")[0]
    try:
        check_model_path(name)
    except CLIError as local:
        return str(local)
    return (
        f"The model {name!r} is not a local directory and the Hugging Face Hub is unreachable from here or has no such "
        f"model ({detail}). Point MODEL at a local directory saved with save_pretrained() (download it where the Hub "
        f"is reachable, e.g. `hf download {name} --local-dir DIR`); set HF_HUB_OFFLINE=1 to skip the connection "
        "retries."
    )


def load_processor(name: str | None, required: bool = True):
    """The model's image processor, or None when it has none and `required` is False."""
    from transformers import AutoImageProcessor

    name = name or demo_model_dir()
    try:
        return AutoImageProcessor.from_pretrained(name)
    except Exception as err:
        if not required:
            return None
        raise CLIError(
            f"Could not load the image processor of {name} ({one_line(err).split('. ')[0]}); the dataset holds raw "
            "images, so the model directory needs its preprocessor_config.json."
        ) from err


def load_dataset_split(name: str | None, split: str | None, prefer: tuple[str, ...], num_samples: int | None = None):
    """(dataset, description) of one split; `name=None` is the shipped demo digits."""
    from ..data.loading import DatasetLoadError, load_image_dataset, pick_split

    try:
        if name is None:
            from ..demo import DATASET_NAME, load_digits

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


def keep_label_ids(dataset, label_column: str):
    """`dataset` with the class names of `label_column` dropped (plain integer ids): `--ignore-label-names`."""
    import datasets

    feature = (getattr(dataset, "features", None) or {}).get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        return dataset
    return dataset.cast_column(label_column, datasets.Value("int64"))


def label_names_error(err) -> CLIError:
    """A `LabelMismatchError` in the command line's terms (the option that keeps the ids)."""
    return CLIError(err.describe("or pass --ignore-label-names if the dataset's label ids already are the model's ids "
                                 "(e.g. ImageNet synset folders in the standard order)"))


def resolve_columns(dataset, image_column, label_column, need_label):
    from ..data.loading import DatasetLoadError
    from ..data.loading import resolve_columns as resolve

    try:
        return resolve(dataset, image_column, label_column, need_label=need_label)
    except DatasetLoadError as err:
        raise CLIError(err) from err


def quantize_model(model, config, dataset, processor, image_column, show_progress=True):
    """`LRPQuantizer(config).quantize_model(...)`, with invalid inputs as one-line `CLIError`s."""
    from .. import LRPQuantizer
    from ..data.labels import LabelMismatchError

    try:
        return LRPQuantizer(config).quantize_model(model, dataset, image_processor=processor,
                                                   image_column=image_column, show_progress=show_progress)
    except LabelMismatchError as err:
        raise label_names_error(err) from err
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CLIError(err) from err


# ------------------------------------------------------------------------------------------------------------------
# devices and progress bars
# ------------------------------------------------------------------------------------------------------------------


def available_devices() -> list[str]:
    """The devices this torch can run on: cpu, then each visible accelerator (cuda:0, ..., mps, xpu:0, ...)."""
    import torch

    devices = ["cpu"]
    for kind in ("cuda", "xpu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            devices += [f"{kind}:{i}" for i in range(module.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str):
    """`torch.device(name)` after checking this torch can use it; a one-line `CLIError` naming the device and the
    available ones otherwise (e.g. `--device cuda` with a CPU-only torch)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CLIError(f"--device {name}: not a device name (e.g. cpu, cuda, cuda:1, mps); available devices: "
                       f"{', '.join(available_devices())}.") from err
    if device.type == "cpu":
        return device
    available = available_devices()
    listed = ", ".join(available)
    if device.type == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise CLIError(f"--device {name}: this torch ({torch.__version__}) is built without CUDA; available devices: "
                       f"{listed}. Use --device cpu, or install a CUDA build of torch.")
    visible = [d for d in available if d.split(":")[0] == device.type]
    if not visible:
        raise CLIError(f"--device {name}: no {device.type} device is visible to this torch ({torch.__version__}); "
                       f"available devices: {listed}.")
    if device.index is not None and f"{device.type}:{device.index}" not in visible:
        raise CLIError(f"--device {name}: there is no {device.type} device {device.index}; available devices: "
                       f"{listed}.")
    return device


def progress_disabled(quiet: bool = False) -> bool:
    """Progress bars off: `--quiet`, or the environment variable TQDM_DISABLE set (to anything but '', 0, false,
    no or off)."""
    return quiet or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def progress_bars_off(off: bool = True):
    """While the block runs, no progress bars from datasets, huggingface_hub or transformers (downloads, dataset
    preparation, weight loading); each library's setting is restored afterwards. Nothing is imported when `off` is
    False."""
    if not off:
        yield
        return
    import datasets.utils.logging as datasets_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    restore = []
    if datasets_logging.is_progress_bar_enabled():
        datasets_logging.disable_progress_bar()
        restore.append(datasets_logging.enable_progress_bar)
    if not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        restore.append(hub_utils.enable_progress_bars)
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        restore.append(transformers_logging.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


# ------------------------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Plain-text table; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *[line(r) for r in cells[1:]]])


def format_size(num_bytes: float) -> str:
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KB", "MB"):
        num_bytes /= 1024
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1024:.1f} GB"


def format_percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def weights_size(model, directory: str | None = None) -> int:
    """Bytes of the safetensors files in `directory` if given and present, else of the model's state dict."""
    if directory and os.path.isdir(directory):
        files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
        if files:
            return sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def average_bits(model) -> tuple[str, str]:
    """(weight bits, activation bits) for a table: the averages of a quantized model, else its float width."""
    from ..configuration import lrpq_config_of

    if lrpq_config_of(model) is not None:
        from ..reporting.summary import bits_summary

        summary = bits_summary(model)
        return f"{summary['weight_bits']:.2f}", f"{summary['activation_bits']:.2f}"
    bits = str(next(model.parameters()).element_size() * 8)
    return bits, bits
