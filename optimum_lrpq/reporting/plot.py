"""Plot of what LRP-QViT decided: relevance per layer and the weight / activation bits it was given.

    from optimum_lrpq.reporting.plot import plot_bits_and_relevance
    qc = qmodel.config.quantization_config
    plot_bits_and_relevance(qc.layer_bits, qc.relevance, "lrpq_bits.png",
                            order=[name for name, _ in qmodel.named_modules()])

matplotlib is imported lazily and drawn with its Agg canvas directly (no pyplot, no global backend switch), so this
works on headless machines, never opens a window and leaves a notebook's backend alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .summary import weight_layer_names

# Module names that only group layers; left out of plot labels.
_CONTAINERS = frozenset({"encoder", "layers", "layer", "blocks", "embeddings"})


def short_layer_name(name: str) -> str:
    """'vit.layers.3.attention.q_proj' -> '3.attention.q_proj'; 'swin.encoder.layers.1.blocks.0.mlp.fc1' -> '1.0.mlp.fc1'."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in _CONTAINERS:
        parts = parts[1:]  # the base model's attribute (vit, swin, ...): any architecture, no list of families
    return ".".join(p for p in parts if p not in _CONTAINERS) or name


def plot_bits_and_relevance(
    layer_bits: Mapping[str, Mapping[str, int]],
    relevance: Mapping[str, float] | None,
    path: str | os.PathLike,
    title: str | None = None,
    *,
    order: Sequence[str] | None = None,
) -> str:
    """Write a PNG with, per weight layer, its relevance (top) and its weight / activation bits (bottom).

    Args:
        layer_bits: `quantization_config.layer_bits` (layer name -> {"weight": b, "activation": b}).
        relevance: `quantization_config.relevance` (layer name -> share of relevance), or None (uniform
            quantization: only the bits are drawn).
        path: where to write the PNG (parent folders are created).
        title: figure title.
        order: module names in model order (`[n for n, _ in model.named_modules()]`); default: natural sort.

    Returns:
        The path written, as a string.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = weight_layer_names(layer_bits, order)
    if not names:
        raise ValueError("layer_bits has no layer with weight bits; is this the config of an lrpq-quantized model?")
    labels = [short_layer_name(n) for n in names]
    x = list(range(len(names)))
    weight = [layer_bits[n]["weight"] for n in names]
    activation = [layer_bits[n].get("activation", 0) for n in names]

    with_relevance = bool(relevance)
    width = min(max(6.0, 0.32 * len(names) + 2.0), 40.0)
    fig = Figure(figsize=(width, 6.5 if with_relevance else 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if with_relevance else 1, 1, sharex=True, squeeze=False)[:, 0]
    if with_relevance:
        ax = axes[0]
        ax.bar(x, [relevance.get(n, 0.0) for n in names], color="tab:purple")
        ax.set_ylabel("LRP relevance (share)")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-1]
    ax.bar([i - 0.2 for i in x], weight, width=0.4, label="weight bits", color="tab:blue")
    ax.bar([i + 0.2 for i in x], activation, width=0.4, label="input activation bits", color="tab:orange")
    ax.set_ylabel("bits")
    top = max(weight + activation)
    ax.set_ylim(0, top + 1.5)
    ax.set_yticks(range(top + 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncols=2, fontsize="small", frameon=False)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize="x-small" if len(names) > 40 else "small")
    fig.suptitle(title or ("LRP-QViT: relevance and bits per layer" if with_relevance else "LRP-QViT: bits per layer"))
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, format="png")
    return path
