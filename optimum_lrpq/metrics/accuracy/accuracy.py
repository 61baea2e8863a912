"""Top-1 accuracy as an `evaluate` metric module that works offline.

`evaluate.load("accuracy")` fetches the canonical script from the Hugging Face Hub (and needs scikit-learn), so it
fails without network access. optimum-lrpq ships this equivalent module instead and loads it by path, which never
touches the network (it also works under `HF_HUB_OFFLINE=1`):

    import evaluate
    from optimum_lrpq.metrics import ACCURACY_PATH, load_accuracy
    metric = evaluate.load(ACCURACY_PATH)      # == load_accuracy()
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.compute()                           # {'accuracy': 0.5}

Same inputs and output as the canonical metric: integer `predictions` and `references`, optional
`sample_weight`, `normalize=True` (fraction) or `False` (count of correct predictions).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to the references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction of correct predictions (default) or their number.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float or int): the fraction (or number) of correct predictions.
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in length.")
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if not normalize:
            return {"accuracy": int(total) if sample_weight is None else total}
        denominator = float(weights.sum())
        return {"accuracy": total / denominator if denominator else 0.0}
