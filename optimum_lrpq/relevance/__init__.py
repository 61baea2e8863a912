"""Layer-wise relevance propagation for ViT, DeiT, Swin and DINOv2: one contribution score per quantizable layer.

``compute_relevance`` is the entry point. Rules are pure functions in ``rules``; ``propagation`` puts them into the
autograd graph with module hooks; ``attention`` registers the attention function that carries relevance through
q @ k^T, softmax and A @ v; ``scores`` turns per-image relevance into normalised layer scores.
"""

from .api import RULES, TARGETS, compute_relevance, relevance_trace
from .attention import ATTENTION_KEY
from .layout import SUPPORTED_MODELS, quantizable_layers
from .propagation import RelevanceTrace, run_relevance_pass
from .scores import SCORES, layer_scores

__all__ = [
    "ATTENTION_KEY",
    "RULES",
    "SCORES",
    "SUPPORTED_MODELS",
    "TARGETS",
    "RelevanceTrace",
    "compute_relevance",
    "layer_scores",
    "quantizable_layers",
    "relevance_trace",
    "run_relevance_pass",
]
