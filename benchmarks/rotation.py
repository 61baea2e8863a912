"""Does an orthogonal rotation help lrpq at 4-bit activations? A measurement on the real-weight benchmark models.

Two rotations, both exact in float (the rotated float model gives the same logits to ~1e-6 relative, printed):

- ``residual``: the residual stream is rotated, h -> h Q (QuaRot / SpinQuant's R1 for ViTs). Every writer of the
  stream (patch embedding, CLS / mask tokens, position embeddings, o_proj and fc2 with their LayerScale folded in)
  gets Q on its output side; every LayerNorm's affine is folded into its readers (q/k/v, fc1, the classifier) with
  Q on their input side, and the LayerNorm keeps gamma = 1, beta = 0. LayerNorm centres its input, which commutes
  with Q only if Q maps the all-ones direction onto itself, so Q is completed by a Householder reflection that does
  (`keep_mean`); then LayerNorm(h Q) = LayerNorm(h) Q exactly.
- ``fc2``: the input of every fc2 (the GELU output) is rotated online, g -> g Q, and fc2's weight becomes W Q.
- ``heads``: each attention head's q and k are rotated by one Q (q Q (k Q)^T = q k^T) and its v by another (the
  head's output P v Q, undone in o_proj's input columns): QuaRot's per-head R2, folded into q/k/v_proj's output rows
  and o_proj's input columns, no online op. Q is the head_dim Hadamard (signs random but for ``hadamard``).

Q is a block-diagonal Sylvester Hadamard matrix (blocks of the largest power of two dividing the width, random
signs; ``hadamard``), that plus the mean-keeping reflection (``hadamard+mean``: dense, a rank-1 update of the block
matrix), or a random orthogonal matrix (``random``, dense, with the reflection). The rotated float model is then
quantized with `LRPQConfig(weight_bits, activation_bits, seed)` (library defaults otherwise) and evaluated on the
first 1000 zoo test digits, one calibration draw per seed, next to the unrotated model.

    python benchmarks/rotation.py --variants none residual:hadamard+mean fc2:hadamard+mean --seeds 0 1 2
    python benchmarks/rotation.py --model deit_dinov2 --variants none fc2:hadamard+mean    # fc2 only for DeiT
    python benchmarks/rotation.py --variants none heads:hadamard heads:random-signs          # any model

Not a test: minutes per variant and seed (each row quantizes DINOv2-S once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.models import get_adapter


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def orthogonal(width: int, kind: str, seed: int) -> torch.Tensor:
    """A [width, width] orthogonal matrix Q (float64) of `kind` ("hadamard", "hadamard+mean", "random"); the
    "+mean" and "random" kinds map the all-ones vector onto itself (ones @ Q == ones)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    elif kind in ("hadamard", "hadamard+mean"):
        block = width & -width
        signs = torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1
        q = signs[:, None] * torch.block_diag(*[hadamard(block)] * (width // block))
    else:
        raise ValueError(f"unknown rotation kind {kind!r}")
    if kind != "hadamard":
        ones = torch.full((1, width), width ** -0.5, dtype=torch.float64)
        v = ones @ q - ones
        if float(v.norm()) > 1e-12:  # the reflection across v maps (ones @ q) back to ones
            q = q @ (torch.eye(width, dtype=torch.float64) - 2 * v.T @ v / float(v @ v.T))
    return q


@torch.no_grad()
def _rotate_outputs(linear_or_conv: nn.Module, q: torch.Tensor, layer_scale: torch.Tensor | None = None) -> None:
    """Output channels o -> (o * layer_scale) @ q: W' = q^T diag(s) W, b' = (s * b) q."""
    w = linear_or_conv.weight.double()
    scale = layer_scale.double() if layer_scale is not None else torch.ones(w.shape[0], dtype=torch.float64)
    flat = (scale[:, None] * w.reshape(w.shape[0], -1))
    linear_or_conv.weight.copy_((q.T @ flat).reshape(w.shape).float())
    if linear_or_conv.bias is not None:
        linear_or_conv.bias.copy_(((linear_or_conv.bias.double() * scale) @ q).float())


@torch.no_grad()
def _fold_norm_into_readers(norm: nn.LayerNorm, readers: list[nn.Linear], q: torch.Tensor, chunks: int = 1) -> None:
    """reader(norm(h) * gamma + beta) with the stream rotated: W' = W diag(gamma) q per input chunk, b' = b + W beta;
    then gamma = 1, beta = 0."""
    gamma, beta = norm.weight.double(), norm.bias.double()
    width = gamma.numel()
    for reader in readers:
        w = reader.weight.double()
        parts = [w[:, i * width:(i + 1) * width] for i in range(chunks)]
        bias = reader.bias.double() + sum(part @ beta for part in parts)
        reader.weight.copy_(torch.cat([(part * gamma) @ q for part in parts], dim=1).float())
        reader.bias.copy_(bias.float())
    norm.weight.fill_(1.0)
    norm.bias.zero_()


@torch.no_grad()
def rotate_residual_stream(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream of a `Dinov2ForImageClassification` in place (see the module docstring)."""
    embeddings = model.dinov2.embeddings
    _rotate_outputs(embeddings.patch_embeddings.projection, q)
    for name in ("cls_token", "mask_token", "position_embeddings"):
        tensor = getattr(embeddings, name)
        tensor.copy_((tensor.double() @ q).float())
    for layer in model.dinov2.encoder.layer:
        attention = layer.attention
        _fold_norm_into_readers(layer.norm1, [attention.q_proj, attention.k_proj, attention.v_proj], q)
        _rotate_outputs(attention.o_proj, q, layer.layer_scale1.lambda1)
        layer.layer_scale1.lambda1.fill_(1.0)
        _fold_norm_into_readers(layer.norm2, [layer.mlp.fc1], q)
        _rotate_outputs(layer.mlp.fc2, q, layer.layer_scale2.lambda1)
        layer.layer_scale2.lambda1.fill_(1.0)
    # the head reads concat(CLS token, mean of the patch tokens) of the final LayerNorm: two chunks of the width
    _fold_norm_into_readers(model.dinov2.layernorm, [model.classifier], q, chunks=2)


class RotatedActivation(nn.Module):
    """`activation(x) @ q`: the MLP activation followed by the online rotation of fc2's input."""

    def __init__(self, activation: nn.Module, q: torch.Tensor) -> None:
        super().__init__()
        self.activation = activation
        self.register_buffer("q", q.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x) @ self.q


@torch.no_grad()
def rotate_fc2_inputs(model: nn.Module, kind: str, seed: int) -> None:
    """Rotate every block's fc2 input online (any supported architecture: the blocks come from its lrpq layout)."""
    for block in get_adapter(model).layout(model).blocks:
        fc2 = model.get_submodule(block.fc2)
        q = orthogonal(fc2.in_features, kind, seed)
        model.set_submodule(block.mlp_activation, RotatedActivation(model.get_submodule(block.mlp_activation), q))
        fc2.weight.copy_((fc2.weight.double() @ q).float())


@torch.no_grad()
def rotate_heads(model: nn.Module, kind: str, seed: int) -> None:
    """Rotate every head's q, k (one matrix) and v (another) in place, folded into the weights (see the docstring)."""
    generator = torch.Generator().manual_seed(seed)
    for block in get_adapter(model).layout(model).blocks:
        heads = model.get_submodule(block.attention).num_attention_heads
        q_proj, k_proj, v_proj, o_proj = (model.get_submodule(n) for n in (block.q, block.k, block.v, block.o))
        width = q_proj.out_features // heads
        base = hadamard(width)
        for head in range(heads):
            rows = slice(head * width, (head + 1) * width)
            rotations = []
            for _ in range(2):
                signs = (torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1
                         if kind != "hadamard" else torch.ones(width, dtype=torch.float64))
                rotations.append(base * signs[None, :])
            for linear, rotation in ((q_proj, rotations[0]), (k_proj, rotations[0]), (v_proj, rotations[1])):
                weight, bias = linear.weight.double(), linear.bias.double()
                weight[rows] = rotation.T @ weight[rows]  # out_h -> out_h @ R
                bias[rows] = bias[rows] @ rotation
                linear.weight.copy_(weight.float())
                linear.bias.copy_(bias.float())
            weight = o_proj.weight.double()
            weight[:, rows] = weight[:, rows] @ rotations[1]
            o_proj.weight.copy_(weight.float())


def rotated_model(name: str, variant: str, seed: int) -> nn.Module:
    model = zoo.load_model(name).eval()
    if variant == "none":
        return model
    where, _, kind = variant.partition(":")
    if where == "residual":
        if name != "dinov2":
            raise ValueError("the residual-stream rotation is written for the dinov2 model only")
        rotate_residual_stream(model, orthogonal(model.config.hidden_size, kind, seed))
    elif where == "fc2":
        rotate_fc2_inputs(model, kind, seed)
    elif where == "heads":
        rotate_heads(model, kind, seed)
    else:
        raise ValueError(f"unknown variant {variant!r} (none, residual:KIND, fc2:KIND, heads:KIND)")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dinov2", "deit_dinov2"], default="dinov2",
                        help="zoo model (the residual-stream variants need dinov2)")
    parser.add_argument("--variants", nargs="+", default=["none", "residual:hadamard+mean", "fc2:hadamard+mean"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--test-images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pixel_values, labels = zoo.test_set(args.model, limit=args.test_images)
    reference = zoo.load_model(args.model).eval()
    with torch.no_grad():
        reference_logits = reference(pixel_values=pixel_values[:16]).logits
    print(f"{args.model}, W{args.weight_bits}A{args.activation_bits}, first {args.test_images} test digits, "
          f"32 calibration digits per seed")
    for variant in args.variants:
        accuracies = []
        for seed in args.seeds:
            model = rotated_model(args.model, variant, seed)
            with torch.no_grad():
                logits = model(pixel_values=pixel_values[:16]).logits
            float_error = float((logits - reference_logits).abs().max() / reference_logits.abs().max())
            config = LRPQConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits, seed=seed)
            start = time.perf_counter()
            calibration = zoo.calibration_images(args.model, 32, seed=seed)
            quantized = LRPQuantizer(config).quantize_model(model, calibration, show_progress=False)
            seconds = time.perf_counter() - start
            accuracies.append(zoo.evaluate_accuracy(quantized, pixel_values, labels))
            print(f"  {variant:24s} seed {seed}: top-1 {accuracies[-1]:.1f} %  (rotated float vs float: "
                  f"{float_error:.1e} of the largest logit; quantized in {seconds:.0f} s)", flush=True)
        print(f"{variant:26s} mean {statistics.mean(accuracies):.1f} %  ({' / '.join(f'{a:.1f}' for a in accuracies)})",
              flush=True)


if __name__ == "__main__":
    main()
