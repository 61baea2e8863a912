"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight matrix one input column at a time and spread each column's rounding
error over the columns not yet quantized, so as to minimise the layer's output error ||W X − Ŵ X||² on the
calibration inputs X. The grid (per output row) is fixed beforehand; only the rounding changes.

Needs the second-moment matrix H = E[x xᵀ] of the layer's input. Columns are processed in order of decreasing
H diagonal ("act order"), so the channels with the largest activations (DINOv2's post-LayerNorm outliers) are
rounded first and the others absorb their error.

Cost: one Cholesky factorisation and one triangular inverse of H (in_features³ / 3 each) and a sweep over the
columns. The sweep works on the transposed weight, so that each step touches contiguous memory, and in float32
(float64 only for the factorisation); layers that share an input (q, k, v) can be solved together, since the
rows of W are independent given H.
"""

from __future__ import annotations

import torch


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ by 2x2 block recursion, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]: about n³/3 flops in
    matrix products, where a triangular solve against the identity costs n³ (torch has no trtri)."""
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False)
    k = n // 2
    top, bottom = lower_triangular_inverse(lower[:k, :k], leaf), lower_triangular_inverse(lower[k:, k:], leaf)
    out = torch.zeros_like(lower)
    out[:k, :k], out[k:, k:] = top, bottom
    out[k:, :k] = -(bottom @ (lower[k:, :k] @ top))
    return out


def inverse_upper_cholesky(h_reversed: torch.Tensor) -> torch.Tensor:
    """Upper triangular U with Uᵀ U = H⁻¹, given H with its rows and columns in reversed order (GPTQ's row i of U
    updates the columns after i once column i is fixed).

    With J the order-reversing permutation and J H J = L Lᵀ, H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so U = J L⁻¹ J: one
    factorisation and one triangular inverse instead of factorise, invert, factorise again. Float32 (twice as fast
    as float64 here; H is damped by 1 % of its mean diagonal), float64 if the float32 factorisation fails.
    """
    h_reversed = h_reversed.float()
    # LAPACK's factor is column-major; torch then zeroes its upper triangle, slowly when the result it returns is
    # row-major. A column-major `out` gives the same values faster (3072 x 3072 on a 2-core Xeon: 125 instead of
    # 149 ms for the factorisation, 304 instead of 374 ms for this function).
    out = torch.empty_like(h_reversed).mT
    lower, info = torch.linalg.cholesky_ex(h_reversed, out=(out, torch.empty((), dtype=torch.int32,
                                                                               device=h_reversed.device)))
    if info.item() != 0:
        lower = torch.linalg.cholesky(h_reversed.double())
    return lower_triangular_inverse(lower).flip((0, 1)).float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int | torch.Tensor,
    damping: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """[out, in] weight rounded onto the per-row grid (`scale`, `zero_point`: [out]) with GPTQ; returns the
    dequantized weight (float32, every value on the grid). `hessian`: [in, in], E[x xᵀ] of the input. `bits`: one
    width, or one per row (rows of layers with different widths solved together)."""
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}.")
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    inverse_order = torch.argsort(order)
    h.diagonal().add_(damping * torch.diag(h).mean())
    reversed_order = order.flip(0)
    h_inv = inverse_upper_cholesky(h[reversed_order[:, None], reversed_order[None, :]])  # one gather

    # Transposed: row j of `w` is input column order[j] of the weight, one value per output row.
    w = weight.detach().float()[:, order].T.contiguous()
    scale = scale.reshape(-1).float()
    inv_scale = 1.0 / scale
    zero_point = zero_point.reshape(-1).float()
    offset = -zero_point * scale  # dequantized = codes * scale + offset
    qmax = (2.0 ** torch.as_tensor(bits, dtype=torch.float32) - 1).expand_as(scale).contiguous()
    zero = torch.zeros_like(qmax)
    out = torch.empty_like(w)
    # The sweep is ~10 tensor ops per input column; they are written with out= / in-place forms because per-op
    # overhead, not arithmetic, dominates for rows of a few hundred values.
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[start:end]  # a view: updated in place
        errors = torch.empty_like(block)
        h_block = h_inv[start:end, start:end]
        inv_diagonal = (1.0 / h_block.diagonal()).tolist()
        for i in range(end - start):
            column, quantized, error = block[i], out[start + i], errors[i]
            torch.addcmul(zero_point, column, inv_scale, out=quantized).round_()
            torch.clamp(quantized, zero, qmax, out=quantized)
            torch.addcmul(offset, quantized, scale, out=quantized)
            torch.sub(column, quantized, out=error).mul_(inv_diagonal[i])
            if i + 1 < end - start:
                block[i + 1:].addr_(h_block[i, i + 1:], error, alpha=-1.0)
        if end < columns:
            w[end:].addmm_(h_inv[start:end, end:].T, errors, alpha=-1.0)
    return out.T[:, inverse_order].contiguous()
