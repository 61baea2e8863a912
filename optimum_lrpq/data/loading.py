"""Image datasets named by a string: a Hub dataset, a saved `datasets` directory, or an image folder.

Used by on-the-fly quantization (`LRPQConfig(calibration_dataset=...)`, see `load_calibration_dataset`) and by the
command line (`optimum-lrpq quantize/evaluate --dataset ...`).

- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` -> `datasets.load_from_disk`;
- any other directory -> the `imagefolder` builder (`root/<split>/<class>/*.png`, or `root/<class>/*.png` = train);
- a name that looks like a local path (`local_path_reason`) but is no directory: refused at once ("No such
  directory"), instead of being looked up on the Hub (which retries for about half a minute before failing);
- anything else is a Hub dataset name, read in streaming mode so that a few calibration images (or `--limit`
  evaluation images) never download a whole dataset such as ImageNet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .images import IMAGE_COLUMNS, LABEL_COLUMNS


class DatasetLoadError(ValueError):
    """A dataset could not be found or read, or lacks a column; the message says what to do instead."""


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


# Last path components that name a split of an image folder (`root/<split>/<class>/*.png`); a Hub id `owner/train`
# is far less likely than a mistyped `data/train`.
SPLIT_DIRECTORY_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "eval", "calibration")


def local_path_reason(name: str | os.PathLike, image_folder_splits: bool = True) -> str | None:
    """Why `name` is a local path rather than a Hub id (`name` or `owner/name`), or None when it may be a Hub id.

    A local path: it starts with `.`, `/`, `~` or a backslash, or with a drive letter (`C:`); it contains a
    backslash, ends with `/`, or has more than one `/` (Hub ids have at most one); its first component is a
    directory here (`data/nonexistent` with `./data` present); or, with `image_folder_splits`, its last component is
    a split folder of an image folder (`mnist/train`, see `SPLIT_DIRECTORY_NAMES`). Whether the path exists is the
    caller's business.
    """
    name = os.fspath(name)
    if name.startswith((".", "/", "~", "\\")):
        return f"it starts with {name[0]!r}"
    if len(name) > 1 and name[1] == ":" and name[0].isalpha():
        return "it starts with a drive letter"
    if "\\" in name:
        return "it contains a backslash"
    if name.endswith("/"):
        return "it ends with '/'"
    parts = name.split("/")
    if len(parts) > 2:
        return "it has more than one '/'"
    if len(parts) == 2:
        if os.path.isdir(parts[0]):
            return f"the directory {parts[0]!r} exists here"
        if image_folder_splits and parts[1].lower() in SPLIT_DIRECTORY_NAMES:
            return f"{parts[1]!r} is the name of an image folder's split directory"
    return None


def check_local_path(name: str | os.PathLike) -> None:
    """Raise `DatasetLoadError` ("No such directory: ...") when the dataset `name` is no directory but looks like a
    local path (`local_path_reason`), or is a file: a mistyped path fails at once instead of being looked up on
    the Hub."""
    path = os.path.expanduser(os.fspath(name))
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise DatasetLoadError(
            f"The dataset {os.fspath(name)!r} is a file, not a directory: pass the directory holding the images (an "
            "image folder root/<split>/<class>/*.png) or a directory written by `save_to_disk`."
        )
    reason = local_path_reason(name)
    if reason is not None:
        raise DatasetLoadError(
            f"No such directory: {os.fspath(name)!r} ({os.path.abspath(path)}). The dataset was read as a local path "
            f"because {reason}; check the path (a Hub dataset is named 'name' or 'owner/name')."
        )


def pick_split(splits: Sequence[str], split: str | None, prefer: Sequence[str], where: str) -> str:
    """`split` if the dataset has it; else the first of `prefer` present, or the only split; else raise."""
    splits = list(splits)
    if split is not None:
        if split not in splits:
            raise DatasetLoadError(f"The dataset {where} has no split {split!r}; available splits: {', '.join(splits)}.")
        return split
    for candidate in prefer:
        if candidate in splits:
            return candidate
    if len(splits) == 1:
        return splits[0]
    raise DatasetLoadError(
        f"The dataset {where} has several splits ({', '.join(splits)}); choose one with --split / calibration_split."
    )


def load_image_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = None,
    *,
    num_samples: int | None = None,
    prefer: Sequence[str] = ("train",),
):
    """One split of an image dataset, limited to its first `num_samples` examples when given.

    Args:
        name_or_path: a Hub dataset name, a `save_to_disk` directory or an image folder.
        split: the split to read; None picks the first of `prefer` that exists (or the only split).
        num_samples: keep only the first examples.
        prefer: split preference when `split` is None.

    Returns:
        A `datasets.Dataset` for local data, a `datasets.IterableDataset` for a streamed Hub dataset.

    Raises:
        DatasetLoadError: with a one-line explanation (missing split, missing directory, unreachable Hub, ...). A
            name that looks like a local path (`local_path_reason`) and is no directory fails at once.
    """
    check_local_path(name_or_path)  # before importing datasets: a mistyped path fails at once
    import datasets

    name = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(name):
        try:
            loaded = datasets.load_from_disk(name) if _is_saved_dataset(name) else datasets.load_dataset(
                "imagefolder", data_dir=name
            )
        except Exception as err:
            raise DatasetLoadError(f"Could not read the dataset directory {name!r}: {_first_line(err)}") from err
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[pick_split(list(loaded), split, prefer, repr(name))]
        if num_samples is not None:
            loaded = loaded.select(range(min(num_samples, len(loaded))))
        return loaded
    try:
        loaded = datasets.load_dataset(name, streaming=True)
        loaded = loaded[pick_split(list(loaded), split, prefer, repr(name))]
    except DatasetLoadError:
        raise
    except Exception as err:
        raise DatasetLoadError(
            f"Could not load the dataset {name!r}: it is not a local directory, and reading it from the Hugging Face "
            f"Hub failed ({_first_line(err)}). Without Hub access, pass a local image folder or a directory written "
            "by `Dataset.save_to_disk`."
        ) from err
    if num_samples is not None:
        loaded = loaded.take(num_samples) if isinstance(loaded, datasets.IterableDataset) else loaded.select(
            range(min(num_samples, len(loaded)))
        )
    return loaded


def materialize(dataset):
    """An `IterableDataset` (few examples) as an in-memory `datasets.Dataset` with known columns and features."""
    import datasets

    if not isinstance(dataset, datasets.IterableDataset):
        return dataset
    rows = list(dataset)
    if not rows:
        raise DatasetLoadError("The dataset is empty.")
    return datasets.Dataset.from_list(rows, features=dataset.features)


def load_calibration_dataset(name_or_path: str, split: str | None, num_samples: int):
    """The first `num_samples` examples of `split`, from a Hub name or a local directory (on-the-fly quantization).

    A streamed Hub dataset is read into memory (only `num_samples` examples), so its columns and image features are
    known to the calibration code even when the Hub's metadata does not list them.
    """
    if not name_or_path:
        raise DatasetLoadError("calibration_dataset is empty: name a Hub dataset or a local directory.")
    return materialize(load_image_dataset(name_or_path, split, num_samples=num_samples))


def dataset_columns(dataset) -> list[str]:
    """Column names; for a streamed dataset whose features are unknown, the keys of its first example."""
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    if names is None:
        first = next(iter(dataset), None)
        names = list(first) if first is not None else []
    return list(names)


def resolve_columns(dataset, image_column: str | None = None, label_column: str | None = None,
                    need_label: bool = True) -> tuple[str, str | None]:
    """(image column, label column) of `dataset`: the requested ones, checked, or found by feature type / name.

    Raises `DatasetLoadError` listing the available columns when a requested column is missing or none is found.
    """
    columns = dataset_columns(dataset)
    listed = ", ".join(columns) or "none"
    for requested, what in ((image_column, "image"), (label_column, "label")):
        if requested is not None and requested not in columns:
            raise DatasetLoadError(f"The dataset has no {what} column {requested!r}; available columns: {listed}.")
    features = getattr(dataset, "features", None) or {}
    if image_column is None:
        typed = [n for n, f in features.items() if type(f).__name__ == "Image"]
        image_column = next(iter(typed + [n for n in IMAGE_COLUMNS if n in columns]), None)
        if image_column is None:
            raise DatasetLoadError(
                f"Could not find the image column; available columns: {listed}. Name it with --image-column."
            )
    if label_column is None:
        typed = [n for n, f in features.items() if type(f).__name__ == "ClassLabel"]
        label_column = next(iter([n for n in LABEL_COLUMNS if n in columns] + typed), None)
        if label_column is None and need_label:
            raise DatasetLoadError(
                f"Could not find the label column; available columns: {listed}. Name it with --label-column."
            )
    return image_column, label_column


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
