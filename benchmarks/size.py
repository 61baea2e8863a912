"""On-disk size of a quantized checkpoint versus its float32 checkpoint.

Prints, for each weight width, the file sizes, the ratio quantized / float32, and the size predicted from first
principles: bits/32 of the quantized layers' float weights + every tensor that stays float + the per-channel
scales, zero points and activation grids. The check of SPEC §4 is that the two agree within 10%.

    python benchmarks/size.py                 # ViT-Base-sized config (random weights), W4 and W8
    python benchmarks/size.py --bits 2 3 4 6 8 --model tiny
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.nn import PackedWeightLayer

CONFIGS = {
    "base": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "num_labels": 1000},
    "tiny": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "num_labels": 10},
}


def file_size(directory: str) -> int:
    return os.path.getsize(os.path.join(directory, "model.safetensors"))


def predicted_size(float_model: torch.nn.Module, qmodel: torch.nn.Module, bits: int) -> float:
    """Bytes expected on disk (tensor payload only; the safetensors header is extra and small)."""
    quantized_weight_names = {f"{n}.weight" for n, m in qmodel.named_modules() if isinstance(m, PackedWeightLayer)}
    float_state = float_model.state_dict()
    packed = sum(float_state[n].numel() * 4 * bits / 32 for n in quantized_weight_names)
    quant_state = qmodel.state_dict()
    rest = sum(t.numel() * t.element_size() for k, t in quant_state.items() if not k.endswith(".qweight"))
    return packed + rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--calibration-images", type=int, default=2)
    args = parser.parse_args()
    logging.disable_progress_bar()

    config = ViTConfig(**CONFIGS[args.model])
    torch.manual_seed(0)
    images = torch.randn(args.calibration_images, 3, config.image_size, config.image_size)
    print(f"model: ViT {args.model} ({sum(p.numel() for p in ViTForImageClassification(config).parameters()) / 1e6:.1f}M params)")
    print(f"{'bits':>4} {'float32 MB':>11} {'lrpq MB':>9} {'ratio':>7} {'predicted MB':>13} {'actual/predicted':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            torch.manual_seed(0)
            float_model = ViTForImageClassification(config).eval()
            float_dir, quant_dir = os.path.join(tmp, f"fp{bits}"), os.path.join(tmp, f"q{bits}")
            float_model.save_pretrained(float_dir)
            reference = {k: v.clone() for k, v in float_model.state_dict().items()}
            float_copy = ViTForImageClassification(config)
            float_copy.load_state_dict(reference)
            qmodel = LRPQuantizer(LRPQConfig(weight_bits=bits, activation_bits=bits, mixed_precision=False,
                                             num_calibration_samples=args.calibration_images)).quantize_model(
                float_model, images, show_progress=False)
            qmodel.save_pretrained(quant_dir)
            fp, q = file_size(float_dir), file_size(quant_dir)
            expected = predicted_size(float_copy, qmodel, bits)
            print(f"{bits:>4} {fp / 1e6:>11.2f} {q / 1e6:>9.2f} {q / fp:>7.3f} {expected / 1e6:>13.2f} {q / expected:>17.3f}")


if __name__ == "__main__":
    main()
