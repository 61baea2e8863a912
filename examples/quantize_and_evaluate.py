"""Quantize any image-classification model with LRP-QViT and compare its top-1 accuracy with the float model.

Works with any `*ForImageClassification` that optimum-lrpq supports (ViT, DeiT, Swin, DINOv2) and any `datasets`
image dataset: a Hub dataset (streamed: only the images used are downloaded), a local image folder
(`root/<split>/<class>/*.png`) or a directory written by `Dataset.save_to_disk`. Images are preprocessed by the
model's own image processor (`AutoImageProcessor`), after conversion to RGB (greyscale / RGBA datasets are common).

    # DeiT-S on ImageNet-1k (gated dataset: accept its terms on the Hub and `hf auth login` first)
    python examples/quantize_and_evaluate.py --model facebook/deit-small-patch16-224 --dataset imagenet-1k \\
        --calibration-split train --eval-split validation --limit 2000 --weight-bits 4 --activation-bits 4 \\
        --mixed-precision --output deit-s-lrpq

Accuracy uses the offline `evaluate` metric shipped with optimum-lrpq (`evaluate.load("accuracy")` would need the
network).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import datasets
import evaluate
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.data.labels import LabelMismatchError, label_mapping
from optimum_lrpq.metrics import ACCURACY_PATH


def load_split(name_or_path: str, split: str):
    """One split of a local (save_to_disk or image folder) or Hub (streamed) dataset."""
    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
            return datasets.load_from_disk(name_or_path)[split]
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, split=split)
    return datasets.load_dataset(name_or_path, split=split, streaming=True)


def batches(dataset, processor, image_column: str, label_column: str, batch_size: int, limit: int | None,
            mapping: dict[int, int] | None = None):
    """(pixel_values, labels) batches; images converted to RGB and preprocessed by the model's processor; labels
    translated to the model's ids by `mapping` (dataset id -> model id) where the class names say so."""
    examples = iter(dataset) if limit is None else itertools.islice(dataset, limit)
    while chunk := list(itertools.islice(examples, batch_size)):
        images = [example[image_column].convert("RGB") for example in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        labels = [int(example[label_column]) for example in chunk]
        yield pixels, labels if mapping is None else [mapping.get(label, label) for label in labels]


@torch.inference_mode()
def evaluate_model(model, dataset, processor, args) -> tuple[float, float]:
    """(top-1 accuracy, images per second of the forward passes)."""
    metric = evaluate.load(ACCURACY_PATH)
    seconds, count = 0.0, 0
    try:  # class names the model does not have would make the accuracy meaningless: refuse, naming them
        mapping = label_mapping(dataset, args.label_column, model.config)
    except LabelMismatchError as error:
        raise SystemExit(f"error: {error}") from None
    for pixels, labels in batches(dataset, processor, args.image_column, args.label_column, args.batch_size, args.limit,
                                  mapping):
        start = time.perf_counter()
        predictions = model(pixel_values=pixels).logits.argmax(-1)
        seconds += time.perf_counter() - start
        count += len(labels)
        metric.add_batch(predictions=predictions.tolist(), references=labels)
    return metric.compute()["accuracy"], count / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/deit-small-patch16-224", help="Hub id or local directory")
    parser.add_argument("--dataset", default="imagenet-1k", help="Hub name, image folder or save_to_disk directory")
    parser.add_argument("--calibration-split", default="train")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--num-calibration", type=int, default=32, help="calibration images")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--mixed-precision", action="store_true", help="LRP-guided bits per layer under the budgets")
    parser.add_argument("--output", help="save the quantized model (and its image processor) here")
    args = parser.parse_args(argv)

    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    eval_data = load_split(args.dataset, args.eval_split)

    float_accuracy, float_speed = evaluate_model(model, eval_data, processor, args)

    # Calibration: the first images of the calibration split; the quantizer preprocesses them with `processor`.
    calibration = load_split(args.dataset, args.calibration_split)
    calibration = calibration.take(args.num_calibration)
    config = LRPQConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                        mixed_precision=args.mixed_precision, num_calibration_samples=args.num_calibration)
    quantizer = LRPQuantizer(config)
    qmodel = quantizer.quantize_model(model, calibration, image_processor=processor, image_column=args.image_column)

    q_accuracy, q_speed = evaluate_model(qmodel, eval_data, processor, args)

    mode = "mixed" if args.mixed_precision else "uniform"
    print(f"{'model':<28}{'top-1':>10}{'drop':>10}{'images/s':>12}")
    print(f"{'float':<28}{100 * float_accuracy:>9.2f}%{'':>10}{float_speed:>12.1f}")
    label = f"LRP-QViT W{args.weight_bits}/A{args.activation_bits} {mode}"
    print(f"{label:<28}{100 * q_accuracy:>9.2f}%{100 * (float_accuracy - q_accuracy):>8.2f}pt{q_speed:>12.1f}")
    if args.output:
        qmodel.save_pretrained(args.output)
        processor.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
