"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight matrix one input column at a time and spread each column's rounding
error over the columns not yet quantized, so as to minimise the layer's output error ||W X − Ŵ X||² on the
calibration inputs X. The grid (per output row) is fixed beforehand; only the rounding changes.

Needs the second-moment matrix H = E[x xᵀ] of the layer's input. Columns are processed in order of decreasing
H diagonal ("act order"), so the channels with the largest activations (DINOv2's post-LayerNorm outliers) are
rounded first and the others absorb their error.
"""

from __future__ import annotations

import torch

from .uniform import fake_quantize


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    damping: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """[out, in] weight rounded onto the per-row grid (`scale`, `zero_point`: [out]) with GPTQ; returns the
    dequantized weight (float32, every value on the grid). `hessian`: [in, in], E[x xᵀ] of the input."""
    w = weight.detach().double().clone()
    columns = w.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}] for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}.")
    h = hessian.detach().double().clone()
    scale = scale.reshape(-1, 1).double()
    zero_point = zero_point.reshape(-1, 1).double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    inverse_order = torch.argsort(order)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damping * torch.diag(h).mean())
    # Upper Cholesky factor of H⁻¹: row i holds the update of the columns after i once column i is fixed.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = block[:, i:i + 1]
            quantized = fake_quantize(column, scale, zero_point, bits)
            out[:, start + i:start + i + 1] = quantized
            error = (column - quantized) / h_block[i, i]
            block[:, i:] -= error @ h_block[i:i + 1, i:]
            errors[:, i:i + 1] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return out[:, inverse_order].float()
