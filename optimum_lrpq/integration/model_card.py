"""Model card (README.md) for an lrpq-quantized model: what was quantized, how, to which bits, how well, how to load.

`qmodel.save_pretrained(dir)` and `qmodel.push_to_hub(repo_id)` write this card automatically (see
`serialization.py`); call `write_model_card` yourself to add what only you know, such as the measured accuracy:

    from optimum_lrpq.integration.model_card import write_model_card
    qmodel.save_pretrained("vit-lrpq")
    write_model_card(qmodel, "vit-lrpq", base_model="google/vit-base-patch16-224", accuracy=0.803)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..configuration import require_lrpq_config
from ..models import get_adapter
from ..nn.attention import LOG2_SOFTMAX_FROM_FORMAT
from ..reporting.summary import bits_summary, ordered_layer_names, weight_layer_names
from ..version import __version__

# Hub tags of every lrpq model (model card front matter, `model.model_tags`).
MODEL_TAGS = ("lrpq", "quantization", "vision")
CARD_NAME = "README.md"
_SIGNATURE = "*Card written by optimum-lrpq"
PLOT_NAME = "lrpq_bits.png"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: Any) -> bool:
    """True for names like 'facebook/deit-small-patch16-224' that are not a local path."""
    return (
        isinstance(name, str) and _HUB_ID.fullmatch(name) is not None and not name.endswith((".", "-"))
        and ".." not in name and not os.path.exists(name)
    )


def is_lrpq_card(text: str) -> bool:
    """True if `text` is a model card written by optimum-lrpq (such a card may be rewritten on the next save)."""
    return _SIGNATURE in text


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _accuracy_section(accuracy: Any) -> list[str]:
    if accuracy is None:
        return []
    lines = ["## Accuracy", ""]
    if isinstance(accuracy, Mapping):
        where = accuracy.get("dataset")
        if where:
            count = f"{accuracy['num_images']} images of " if accuracy.get("num_images") else ""
            split = f" ({accuracy['split']} split)" if accuracy.get("split") else ""
            lines += [f"Top-1 accuracy measured on {count}{where}{split}.", ""]
        lines += ["| model | top-1 accuracy |", "|---|---|"]
        if accuracy.get("float") is not None:
            lines.append(f"| float (base model) | {_percent(accuracy['float'])} |")
        if accuracy.get("quantized") is not None:
            lines.append(f"| **this model** | **{_percent(accuracy['quantized'])}** |")
        if accuracy.get("float") is not None and accuracy.get("quantized") is not None:
            lines.append(f"| drop | {100 * (accuracy['float'] - accuracy['quantized']):.2f} points |")
    else:
        lines.append(f"Top-1 accuracy: **{_percent(float(accuracy))}**.")
    return lines + [""]


def render_model_card(
    model,
    base_model: str | None = None,
    accuracy: float | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    calibration: str | None = None,
    plot: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The model card text; see `write_model_card`."""
    config = require_lrpq_config(model)
    layer_bits, relevance = config.layer_bits, config.relevance or {}
    if base_model is None:
        base_model = config.base_model or getattr(model.config, "_name_or_path", None) or None
    summary = bits_summary(model)
    architecture = type(model).__name__
    # mixed precision requested, but every layer has the same bits (e.g. `uniform_fallback`): say what it is
    same_bits = config.mixed_precision and _all_equal_bits(model, layer_bits)
    mixed = config.mixed_precision and not same_bits
    mode = "mixed precision" if mixed else "uniform"
    title = f"{repo_id.split('/')[-1] if repo_id else architecture} (LRP-QViT W{config.weight_bits}/A{config.activation_bits}, {mode})"

    all_tags = list(dict.fromkeys([*MODEL_TAGS, *(tags or [])]))
    front = ["---", "library_name: transformers", "tags:"] + [f"- {tag}" for tag in all_tags]
    front.append("pipeline_tag: image-classification")
    if is_hub_id(base_model):
        front += [f"base_model: {base_model}", "base_model_relation: quantized"]
    front.append("---")

    base_text = (
        f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model)
        else f"`{base_model}`" if base_model else "unknown"
    )
    budget = (
        f"average of **{config.weight_bits} bits** per weight (parameter-weighted) and **{config.activation_bits} "
        f"bits** per activation (MAC-weighted), distributed over the layers by LRP relevance"
        if mixed
        else f"**{config.weight_bits}-bit** weights and **{config.activation_bits}-bit** activations in every layer"
        + (" (mixed precision was asked for; the allocation kept the same bits in every layer, e.g. because they "
           "measured closer to the float model on the calibration images: `uniform_fallback`)" if same_bits else "")
    )
    lines = front + [
        "",
        f"# {title}",
        "",
        (f"Post-training quantization of {base_text} ({architecture}) with optimum-lrpq, an implementation of "
         "[LRP-QViT](https://arxiv.org/abs/2401.11243): Layer-wise Relevance Propagation measures how much each layer "
         "contributes to the prediction, and the most relevant layers get more bits."),
        "",
        "## Quantization",
        "",
        f"- Base model: {base_text}",
        (f"- Method: LRP-QViT ({mode}), RepQ-ViT-style calibration: per-output-channel weights "
         f"({'GPTQ' if getattr(config, 'weight_rounding', 'nearest') == 'gptq' else 'round-to-nearest'} rounding), "
         f"post-LayerNorm activations {_fold_text(config)}, {_input_text(config)}, {_attention_text(config)}, "
         f"{_softmax_text(config)} for "
         "attention probabilities; LayerNorm, softmax, GELU and residual adds stay in floating point"),
        f"- Budget: {budget}",
        (f"- Achieved: {summary['weight_bits']:.2f} average weight bits, {summary['activation_bits']:.2f} average "
         f"activation bits (patch embedding excluded: {config.patch_embedding_input_bits}-bit image input)"),
        f"- Calibration: the first {config.num_calibration_samples} images"
        + (f" of {calibration}" if calibration else ""),
        (f"- Weights are stored as packed integer codes (safetensors); optimum-lrpq {config.lrpq_version}, "
         f"format version {config.format_version}"),
        "",
    ]
    lines += _accuracy_section(accuracy)
    lines += [
        "## Usage",
        "",
        "```bash",
        "pip install optimum-lrpq",
        "```",
        "",
        "```python",
        "import optimum_lrpq  # registers the lrpq quantization method with transformers",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "",
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id or "path/to/this/folder"}")',
        f'processor = AutoImageProcessor.from_pretrained("{repo_id or "path/to/this/folder"}")',
        'inputs = processor(images=image.convert("RGB"), return_tensors="pt")',
        "predicted = model(**inputs).logits.argmax(-1).item()",
        "print(model.config.id2label[predicted])",
        "```",
        "",
        "## Bits per layer",
        "",
    ]
    if plot:
        lines += [f"![relevance and bits per layer]({plot})", ""]
    order = [name for name, _ in model.named_modules()]
    names = weight_layer_names(layer_bits, order)
    header = "| layer | weight bits | input activation bits |" + (" LRP relevance |" if relevance else "")
    lines += [header, "|---|---|---|" + ("---|" if relevance else "")]
    for name in names:
        entry = layer_bits[name]
        row = f"| `{name}` | {entry['weight']} | {entry.get('activation', '')} |"
        if relevance:
            row += f" {relevance.get(name, 0.0):.4f} |"
        lines.append(row)
    shared = ordered_layer_names((n for n, entry in layer_bits.items() if "weight" not in entry), order)
    if shared:
        lines += [
            "",
            ("Activation quantizers shared by several layers (LayerNorm outputs read by q/k/v or fc1; attention "
             "operands q, k, v and probabilities):"),
            "",
            "| module | activation bits |",
            "|---|---|",
        ] + [f"| `{n}` | {layer_bits[n]['activation']} |" for n in shared]
    lines += ["", f"{_SIGNATURE} {__version__}.*", ""]
    return "\n".join(lines)


def write_model_card(
    model,
    directory: str | os.PathLike,
    base_model: str | None = None,
    accuracy: float | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    calibration: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """Write `README.md` for a quantized model into `directory`; return its path.

    Args:
        model: the lrpq-quantized model (its `quantization_config` holds the bits and relevance).
        directory: the folder the model was (or will be) saved to.
        base_model: the float model's Hub id or path (default: the model's `name_or_path`); a Hub id also goes
            into the YAML front matter (`base_model`, `base_model_relation: quantized`).
        accuracy: measured top-1 accuracy of the quantized model (a fraction), or a mapping with "quantized" and
            optionally "float", "dataset", "split", "num_images".
        repo_id: the Hub repo the card is for; used in the loading snippet (default: a placeholder path).
        calibration: the calibration data, e.g. "imagenet-1k (train)" (the card says "the first N images of ...").
        tags: Hub tags added to the lrpq ones in the front matter.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    plot = PLOT_NAME if os.path.exists(os.path.join(directory, PLOT_NAME)) else None
    text = render_model_card(model, base_model, accuracy, repo_id=repo_id, calibration=calibration, plot=plot,
                             tags=tags)
    path = os.path.join(directory, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _input_text(config) -> str:
    block = getattr(config, "linear_input_granularity", "per_tensor") == "per_channel"
    heads = getattr(config, "head_input_granularity", "per_tensor") == "per_channel"
    text = "per-channel steps for the inputs of o_proj and fc2" if block else "per-tensor inputs of o_proj and fc2"
    return text + (", and of the classifier heads below 8 bits" if heads else "")


def _attention_text(config) -> str:
    if getattr(config, "attention_granularity", "per_tensor") == "per_head":
        return "q, k, v with one grid per head"
    return "q, k, v per tensor"


def _softmax_text(config) -> str:
    if config.softmax_quantizer == "auto":
        if getattr(config, "format_version", 0) >= LOG2_SOFTMAX_FROM_FORMAT:
            return "log2 quantizers at 2-3 bits, log√2 ones at 4-6 bits and uniform ones at 7-8 bits"
        return "log√2 quantizers below 7 bits and uniform ones at 7-8 bits"
    return f"`{config.softmax_quantizer}` quantizers"


def _fold_text(config) -> str:
    if not config.reparameterize:
        return "quantized per channel"
    strength = getattr(config, "fold_strength", 1.0)
    if isinstance(strength, list):
        return "partially reparameterized into a per-tensor quantizer (fold strength searched per LayerNorm)"
    if strength == 1.0:
        return "reparameterized into a per-tensor quantizer"
    return f"partially reparameterized into a per-tensor quantizer (fold strength {strength:g})"


def _all_equal_bits(model, layer_bits: dict[str, dict[str, int]]) -> bool:
    """Whether every weight layer but the patch embedding has the same (weight, activation) bits."""
    patch_embedding = get_adapter(model).layout(model).patch_embedding
    return len({(layer_bits[name]["weight"], layer_bits[name].get("activation"))
                for name in weight_layer_names(layer_bits) if name != patch_embedding}) <= 1
