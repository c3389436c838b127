"""Step 2's loss terms for a chunk of rows in one Triton kernel (CUDA): KL(teacher || student) of
each row of logits, and its gradient softmax(s) - softmax(t), the same math as
`radlads.train.losses.kl_terms` (its reference, parity-tested).

The chunk's logits are the largest tensors of step 2 ([4096, V] bf16, twice), so the terms are
bound by memory traffic. The kernel reads each row twice and writes the gradient once: a first
pass keeps running maxima and sums of exp for both rows (online softmax), and the KL's
sum p_t (t - s) rescaled the same way; a second pass writes the gradient. The gradient may
overwrite the student's logits (`out=s_logits`), which the caller no longer needs.

Imported only where Triton is (a CUDA install): nothing else in radlads imports it eagerly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# The fastest of those bench/triton_kernels.py tries on an H100 for V = 151936 (docs/benchmarks.md).
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _kl_rows(s_ptr, t_ptr, grad_ptr, loss_ptr, V, s_stride, t_stride, grad_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    grad_ptr += row * grad_stride

    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    tilt = 0.0  # sum exp(t - m_t) * (t - s)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        s = tl.load(s_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
        new_m_s = tl.maximum(m_s, tl.max(s, 0))
        z_s = z_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(s - new_m_s), 0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(t, 0))
        e_t = tl.exp(t - new_m_t)
        rescale = tl.exp(m_t - new_m_t)
        z_t = z_t * rescale + tl.sum(e_t, 0)
        # outside the row both logits are -inf: their difference is NaN, masked out here
        tilt = tilt * rescale + tl.sum(tl.where(inside, e_t * (t - s), 0.0), 0)
        m_t = new_m_t

    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    # KL = sum p_t (log p_t - log p_s) = sum p_t (t - s) - lse_t + lse_s, as sum p_t = 1
    tl.store(loss_ptr + row, tilt / z_t - lse_t + lse_s)

    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        s = tl.load(s_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(s - lse_s) - tl.exp(t - lse_t)
        tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def kl_terms_triton(
    s_logits: Tensor,
    t_logits: Tensor,
    out: Tensor | None = None,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """Summed KL(teacher || student) of [N, V] rows of logits (fp32), and its gradient wrt the
    student's logits in their dtype, written to `out` (may be `s_logits` itself)."""
    if s_logits.shape != t_logits.shape or s_logits.stride(-1) != 1 or t_logits.stride(-1) != 1:
        raise ValueError(
            f"kl_terms_triton needs two [N, V] logit tensors of one shape with unit column stride; "
            f"got {tuple(s_logits.shape)} and {tuple(t_logits.shape)}"
        )
    n, v = s_logits.shape
    out = torch.empty_like(s_logits) if out is None else out
    loss = torch.empty(n, dtype=torch.float32, device=s_logits.device)
    if n:
        _kl_rows[(n,)](
            s_logits, t_logits, out, loss, v, s_logits.stride(0), t_logits.stride(0), out.stride(0),
            BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return loss.sum(), out
