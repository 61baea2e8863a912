"""Evaluation metrics shipped with optimum-lrpq, loadable with `evaluate.load(<path>)` without network access.

`evaluate.load("accuracy")` downloads its script from the Hugging Face Hub; `load_accuracy()` loads the vendored
equivalent in `metrics/accuracy/accuracy.py` by path instead (works offline and under `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import os

ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")


def load_accuracy(**kwargs):
    """`evaluate.load` of the vendored top-1 accuracy module (offline); kwargs go to `evaluate.load`."""
    import evaluate

    return evaluate.load(ACCURACY_PATH, **kwargs)


__all__ = ["ACCURACY_PATH", "load_accuracy"]
