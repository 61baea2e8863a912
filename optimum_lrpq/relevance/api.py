"""``compute_relevance``: argument checking, batching and progress around one relevance pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..options import RELEVANCE_RULES as RULES
from ..options import RELEVANCE_SCORES as SCORES
from ..options import RELEVANCE_TARGETS as TARGETS
from ..options import check_choice
from .layout import relevance_layout
from .propagation import RelevanceTrace, run_relevance_pass
from .scores import layer_scores

logger = logging.get_logger(__name__)


def _pixel_values(batch, index: int) -> Tensor:
    if isinstance(batch, Mapping) and "pixel_values" in batch:
        batch = batch["pixel_values"]
    if not isinstance(batch, Tensor):
        raise TypeError(f"Batch {index} is a {type(batch).__name__}; expected a pixel_values tensor "
                         "[images, channels, height, width].")
    if batch.dim() != 4:
        raise ValueError(f"Batch {index} has shape {tuple(batch.shape)}; expected [images, channels, height, width].")
    if batch.shape[0] == 0:
        raise ValueError(f"Batch {index} holds no images.")
    return batch


def _label_tensor(labels, index: int, batch_size: int, num_labels: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (batch_size,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"Labels of batch {index} must be an integer tensor of shape ({batch_size},); got "
                         f"{labels.dtype} {tuple(labels.shape)}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"Labels of batch {index} must lie in [0, {num_labels}); got {labels.tolist()}.")
    return labels.long()


def _checked_batches(batches: Iterable, labels: Iterable | None, num_labels: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    label_iter = iter(labels) if labels is not None else None
    count = 0
    for index, batch in enumerate(batches):
        pixel_values = _pixel_values(batch, index)
        target = None
        if label_iter is not None:
            try:
                target = _label_tensor(next(label_iter), index, pixel_values.shape[0], num_labels)
            except StopIteration:
                raise ValueError(f"labels ran out at batch {index}: give one label tensor per batch.") from None
        count += 1
        yield pixel_values, target
    if count == 0:
        raise ValueError("batches is empty: compute_relevance needs at least one batch of images.")
    if label_iter is not None and next(label_iter, None) is not None:
        raise ValueError(f"labels has more entries than the {count} batches: give one label tensor per batch.")


def relevance_trace(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    target: str = "predicted",
    labels: Iterable[Tensor] | None = None,
    rule: str = "chefer",
    weight_scores: bool = False,
    show_progress: bool = False,
) -> RelevanceTrace:
    """Checked arguments, then one relevance pass; returns the per-image trace (see ``RelevanceTrace``)."""
    relevance_layout(model)  # ValueError for an unsupported model, before anything else
    check_choice(target, "target", TARGETS)
    check_choice(rule, "rule", RULES)
    if target == "label" and labels is None:
        raise ValueError('target="label" needs labels: one integer tensor of class indices per batch.')
    if target == "predicted" and labels is not None:
        logger.warning('labels are ignored with target="predicted"; pass target="label" to use them.')
        labels = None
    if isinstance(batches, Tensor):
        raise TypeError("batches must be an iterable of pixel_values tensors, e.g. [pixel_values]; got one tensor.")
    total = len(batches) if hasattr(batches, "__len__") else None
    progress = tqdm(batches, total=total, desc="LRP relevance", unit="batch", disable=not show_progress)
    num_labels = int(model.config.num_labels)
    return run_relevance_pass(model, _checked_batches(progress, labels, num_labels), rule=rule,
                              weight_scores=weight_scores)


def compute_relevance(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    target: str = "predicted",
    labels: Iterable[Tensor] | None = None,
    score: str = "operands",
    rule: str = "chefer",
    show_progress: bool = False,
) -> dict[str, float]:
    """LRP contribution score of every quantizable layer (LRP-QViT, Ranjan & Savakis, arXiv 2401.11243).

    Args:
        model: a float model of a class in ``SUPPORTED_MODELS`` (``ViTForImageClassification``,
            ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``,
            ``SwinForImageClassification``, ``Dinov2ForImageClassification``: the registered architectures with a
            classification head). Left exactly as it was (parameters, requires_grad, training flags, attention
            implementation).
        batches: pixel_values tensors ``[images, 3, H, W]`` (or mappings with a ``"pixel_values"`` entry),
            processed one at a time.
        target: ``"predicted"`` starts relevance (one-hot, value 1) at the predicted class; ``"label"`` at
            ``labels``. With two heads (DeiT with teacher) each head starts with 1/2.
        labels: one integer tensor of class indices per batch, for ``target="label"``.
        score: ``"operands"`` (default: sum |R| over every tensor quantized at the layer's bits: its input, and for
            q/k/v_proj also q, k, v and the attention probabilities), ``"linear_abs"`` (sum |R| at each layer's
            input), ``"branch"`` (relevance entering the attention / MLP branch, given to each of its layers) or
            ``"weight"`` (sum |R_ij| of per-weight relevance).
        rule: ``"chefer"`` (Chefer et al. 2021: alpha1-beta0, z^B, half-split matmuls, renormalised residuals) or
            ``"epsilon"`` (LRP-eps).
        show_progress: show a tqdm bar over batches.

    Returns:
        ``{module name: score}`` for every quantizable weight layer of the model (``layout.weight_layers()`` of its
        architecture adapter: patch embedding, q/k/v/o, fc1/fc2, Swin reduction, heads), in ``named_modules()``
        order: non-negative, normalised to sum 1 per image, averaged over images.
    """
    check_choice(score, "score", SCORES)
    trace = relevance_trace(model, batches, target=target, labels=labels, rule=rule,
                            weight_scores=score == "weight", show_progress=show_progress)
    return layer_scores(trace, score)
