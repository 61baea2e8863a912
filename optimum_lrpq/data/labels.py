"""Class names of a labelled dataset against the labels of a model: which dataset label id is which model label id.

A dataset's label ids are its own numbering: an image folder numbers its class folders alphabetically, a Hub dataset
as its `ClassLabel` lists them. When both the dataset and the model name their classes, the names decide:

- every dataset class name is one of the model's labels (compared without case and surrounding spaces): the
  dataset's ids are mapped to the model's (identity when the orders agree);
- some are not: `LabelMismatchError`, naming them. Comparing ids anyway would score a model against the wrong
  classes (e.g. folders `zero`..`nine` are numbered eight, five, four, ... alphabetically; ~10 % on digits).

A model whose labels are transformers' placeholders (`LABEL_0`, `LABEL_1`, ...) does not name its classes, and a
label column without class names (plain integers) has none either: the ids are then taken as they are. Casting the
label column to plain integers (`dataset.cast_column("label", datasets.Value("int64"))`) is how to say that a
dataset's ids already are the model's although the names differ (e.g. ImageNet synset folders in the standard
order).
"""

from __future__ import annotations

from typing import Any

# How many names an error message lists before "and N more".
_SHOWN = 6


class LabelMismatchError(ValueError):
    """Some class names of a dataset are not among the model's labels.

    Attributes:
        unmatched: the dataset's class names that are not model labels, in dataset id order.
        dataset_names: all class names of the dataset, in id order.
        model_names: the model's labels, in id order.
    """

    def __init__(self, unmatched: list[str], dataset_names: list[str], model_names: list[str]):
        self.unmatched = unmatched
        self.dataset_names = dataset_names
        self.model_names = model_names
        super().__init__(self.describe(
            "or, if the dataset's label ids already are the model's ids, cast the label column to plain integers "
            "(`dataset.cast_column('label', datasets.Value('int64'))`)"
        ))

    def describe(self, alternative: str) -> str:
        """The message, ending with `alternative` (how to keep the ids as they are, in the caller's terms)."""
        return (
            f"The dataset's class names do not match the model's labels (id2label): {len(self.unmatched)} of the "
            f"dataset's {len(self.dataset_names)} classes ({_listing(self.unmatched)}) "
            f"{'is' if len(self.unmatched) == 1 else 'are'} not among the model's "
            f"{len(self.model_names)} labels ({_listing(self.model_names)}), so its label ids cannot be compared "
            "with the model's predictions. Rename the dataset's classes to the model's labels (for an image folder: "
            f"its class folders), {alternative}."
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def _key(name: Any) -> str:
    return str(name).strip().lower()


def model_label_names(model_config: Any) -> list[str] | None:
    """The model's class names in id order, or None when it does not name them (transformers' `LABEL_<i>`
    placeholders, or ids that are not 0..n-1)."""
    id2label = getattr(model_config, "id2label", None) or {}
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if not labels or sorted(labels) != list(range(len(labels))):
        return None
    if all(_key(name) == f"label_{i}" for i, name in labels.items()):
        return None
    return [labels[i] for i in range(len(labels))]


def dataset_label_names(dataset: Any, label_column: str) -> list[str] | None:
    """The class names of `label_column` (a `ClassLabel` feature) in id order, or None when it has none."""
    feature = (getattr(dataset, "features", None) or {}).get(label_column)
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if names else None


def label_mapping(dataset: Any, label_column: str, model_config: Any) -> dict[int, int] | None:
    """Dataset label id -> model label id, or None when the dataset's ids are the model's as they are.

    None when either side does not name its classes, or when every dataset class has the model's name at its own
    id. A class whose name the model has at its own id keeps that id (models may list a name twice, e.g. ImageNet's
    two "crane" classes); the others take the model id of their name.

    Raises:
        LabelMismatchError: some dataset class names are not among the model's labels.
    """
    names = dataset_label_names(dataset, label_column)
    model_names = model_label_names(model_config)
    if not names or model_names is None:
        return None
    model_ids: dict[str, int] = {}
    for i, name in enumerate(model_names):
        model_ids.setdefault(_key(name), i)
    unmatched = [n for n in names if _key(n) not in model_ids]
    if unmatched:
        raise LabelMismatchError(unmatched, names, model_names)
    mapping = {
        i: i if i < len(model_names) and _key(model_names[i]) == _key(n) else model_ids[_key(n)]
        for i, n in enumerate(names)
    }
    return None if all(i == j for i, j in mapping.items()) else mapping
