"""Data-parallel evaluation of a (quantized) image classifier with 🤗 Accelerate.

Each process evaluates its shard of the dataset; predictions and labels are gathered (`gather_for_metrics` drops
the samples padded onto the last shard) and the main process computes top-1 accuracy with the offline `evaluate`
metric shipped with optimum-lrpq. The same script runs on several CPU processes or many GPUs with no code change:

    torchrun --nproc_per_node 2 examples/evaluate_distributed.py --cpu --model deit-s-lrpq \\
        --dataset imagenet-1k --split validation        # 2 CPU processes (gloo); prints "2 process(es)"
    accelerate launch --num_processes 8 examples/evaluate_distributed.py --model deit-s-lrpq --dataset imagenet-1k

On CPU, `--cpu` is what makes the processes one group: `accelerate launch --cpu --num_processes 2` starts a single
process, and without `--cpu` (or `ACCELERATE_USE_CPU=true`) each torchrun process evaluates the whole dataset alone.
Give each process its share of the cores (`OMP_NUM_THREADS`).

`--model` is a Hub id or a local directory: an lrpq-quantized checkpoint (saved by `optimum-lrpq quantize` or
`save_pretrained`) or a float model. The dataset is a Hub name, an image folder or a `save_to_disk` directory.
"""

from __future__ import annotations

import argparse
import os

import datasets
import evaluate
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_lrpq  # noqa: F401 - registers the lrpq quantization method with transformers
from optimum_lrpq.data.labels import LabelMismatchError, label_mapping
from optimum_lrpq.metrics import ACCURACY_PATH


def load_split(name_or_path: str, split: str):
    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
            return datasets.load_from_disk(name_or_path)[split]
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, split=split)
    return datasets.load_dataset(name_or_path, split=split)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory (quantized or float)")
    parser.add_argument("--dataset", required=True, help="Hub name, image folder or save_to_disk directory")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU processes (started by torchrun) form one process group and share the dataset")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(args.model).eval().to(accelerator.device)

    dataset = load_split(args.dataset, args.split)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))

    try:  # class names the model does not have would make the accuracy meaningless: refuse, naming them
        mapping = label_mapping(dataset, args.label_column, model.config) or {}
    except LabelMismatchError as error:
        raise SystemExit(f"error: {error}") from None

    def collate(examples):
        images = [example[args.image_column].convert("RGB") for example in examples]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        labels = [int(example[args.label_column]) for example in examples]
        return pixels, torch.tensor([mapping.get(label, label) for label in labels])

    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    # Only the data loader is prepared (sharded per process); inference needs no DDP wrapper around the model.
    loader = accelerator.prepare(loader)

    metric = evaluate.load(ACCURACY_PATH)
    with torch.inference_mode():
        for pixels, labels in loader:
            predictions = model(pixel_values=pixels.to(model.dtype)).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
            if accelerator.is_main_process:
                metric.add_batch(predictions=predictions.tolist(), references=labels.tolist())

    if accelerator.is_main_process:
        result = metric.compute()
        total = len(dataset)
        print(f"top-1 accuracy: {100 * result['accuracy']:.2f}% on {total} images of {args.dataset} ({args.split}), "
              f"{accelerator.num_processes} process(es)")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
