"""`optimum-lrpq inspect`: the per-layer bits and relevance of a quantized model, their averages, and the plot."""

from __future__ import annotations

import argparse
import os

from .common import add_quiet_argument, check_quantized_model, format_table, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    i = subparsers.add_parser(
        "inspect", help="print the per-layer bits and relevance of a quantized model and plot them",
        description="Print the bits (weights, input activations) and LRP relevance of every layer of an "
        "lrpq-quantized model, their averages, and write the plot.",
    )
    i.add_argument("model", metavar="DIR", help="quantized model directory (or Hub id)")
    i.add_argument("--plot", metavar="PNG", help="where to write the plot (default: DIR/lrpq_bits.png)")
    add_quiet_argument(i)
    i.set_defaults(func=run)
    return i


def run(args) -> int:
    check_quantized_model(args.model)
    from ..integration.model_card import PLOT_NAME, is_hub_id
    from ..reporting.plot import plot_bits_and_relevance
    from ..reporting.summary import bits_summary, ordered_layer_names, weight_layer_names

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
