"""Quantize a model and publish it on the Hugging Face Hub with its model card and bits plot.

    hf auth login
    python examples/push_to_hub.py --model facebook/deit-small-patch16-224 --dataset imagenet-1k \\
        --repo-id me/deit-small-lrpq-w4a4 --mixed-precision

The folder uploaded holds the quantized weights and config, the image processor, `README.md` (model card: base
model, method, budget, per-layer bits and relevance, loading code, and here the measured accuracy) and
`lrpq_bits.png`, uploaded in one commit. A plain `qmodel.push_to_hub(repo_id)` also uploads the lrpq card (without
accuracy, plot or processor); this script shows how to publish everything together.

The folder is written to --output (default: a temporary directory, removed after the upload). When the upload
fails (offline, not logged in, ...), the script says why in one line (exit status 2) and keeps the folder, so it
can be uploaded later with `hf upload REPO FOLDER` without quantizing again.

Anyone can then load it with:

    import optimum_lrpq
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained("me/deit-small-lrpq-w4a4")
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import datasets
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.integration.hub import upload_failure_message, upload_model_folder
from optimum_lrpq.integration.model_card import PLOT_NAME, write_model_card
from optimum_lrpq.reporting.plot import plot_bits_and_relevance


def load_calibration(name_or_path: str, split: str, count: int):
    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
            dataset = datasets.load_from_disk(name_or_path)[split]
        else:
            dataset = datasets.load_dataset("imagefolder", data_dir=name_or_path, split=split)
    else:  # streamed: only `count` images are downloaded
        dataset = datasets.load_dataset(name_or_path, split=split, streaming=True)
    return dataset.take(count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="float model: Hub id or local directory")
    parser.add_argument("--dataset", required=True, help="calibration data: Hub name, image folder or save_to_disk dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--repo-id", required=True, help="e.g. me/deit-small-lrpq-w4a4")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--output", help="folder to write and upload (default: a temporary directory)")
    args = parser.parse_args(argv)

    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(args.model)
    config = LRPQConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                        mixed_precision=args.mixed_precision, num_calibration_samples=args.num_calibration)
    calibration = load_calibration(args.dataset, args.split, args.num_calibration)
    qmodel = LRPQuantizer(config).quantize_model(model, calibration, image_processor=processor,
                                                 image_column=args.image_column)

    folder = args.output or tempfile.mkdtemp(prefix="lrpq-push-")
    qmodel.save_pretrained(folder)
    processor.save_pretrained(folder)
    qc = qmodel.config.quantization_config
    plot_bits_and_relevance(qc.layer_bits, qc.relevance, os.path.join(folder, PLOT_NAME),
                            order=[name for name, _ in qmodel.named_modules()])
    write_model_card(qmodel, folder, base_model=args.model, repo_id=args.repo_id,
                     calibration=f"{args.dataset} ({args.split})")
    try:
        url = upload_model_folder(folder, args.repo_id, private=args.private or None)
    except Exception as err:  # noqa: BLE001 - offline, not logged in, no write access, ...: one line, folder kept
        print(f"push_to_hub.py: error: {upload_failure_message(folder, args.repo_id, err)}", file=sys.stderr)
        sys.exit(2)
    if not args.output:
        shutil.rmtree(folder)
    print(f"pushed: {url}")


if __name__ == "__main__":
    main()
