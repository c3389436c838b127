"""Vocab-sized losses of `hidden @ head.T`, computed a chunk of tokens at a time.

Neither an fp32 [B, T, V] tensor nor the graph of one is ever held: memory is O(chunk * V). When
gradients are needed, each chunk's gradient with respect to its logits is known in closed form
(softmax minus target distribution), so it is turned into the gradients of the hidden states and
of the head right there, in forward; backward only scales them. Against recomputing each chunk's
logits in backward (activation checkpointing), this saves a third of the loss's matmuls (and, for
the KL, the teacher's logits a second time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.common import to_matmul_dtype

# terms(rows, logits) -> (the loss summed over the chunk's tokens in fp32, d loss / d logits in
# the logits' dtype); logits come in the matmul's dtype (bf16 under autocast)
Terms = Callable[[slice, Tensor], tuple[Tensor, Tensor]]


@functools.cache
def compiled(fn):
    """`fn` through torch.compile, as one graph: Inductor fuses the chain of vocab-wide elementwise
    ops and reductions (~15 passes over an fp32 [chunk, V] tensor, each op written out on its own)
    into a few passes over the bf16 logits. Shapes may vary (ragged last chunks, other batches)."""
    return torch.compile(fn, fullgraph=True)


def maybe_compiled(fn, x: Tensor, compile: bool):
    """`fn` compiled when asked and `x` lives on a GPU, else `fn` itself."""
    return compiled(fn) if compile and x.is_cuda else fn  # on CPU compiling costs more than it saves


def fused_kl_terms(s_logits: Tensor, t_logits: Tensor) -> tuple[Tensor, Tensor]:
    """kl_terms in one Triton kernel (CUDA), the gradient written over the student's logits:
    1.10x the compiled kl_terms on an H100, and no separate gradient buffer (docs/benchmarks.md)."""
    from ..kernels.kl_div import kl_terms_triton  # Triton: CUDA installs only

    return kl_terms_triton(s_logits, t_logits, out=s_logits)


def kl_terms(s_logits: Tensor, t_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Summed KL(teacher || student) of rows of logits, and its gradient wrt the student's logits."""
    s_logp = F.log_softmax(s_logits.float(), dim=-1)
    t_logp = F.log_softmax(t_logits.float(), dim=-1)
    t_p = t_logp.exp()
    return (t_p * (t_logp - s_logp)).sum(), (s_logp.exp() - t_p).to(s_logits.dtype)


def cross_entropy_terms(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of rows of logits against `target` ids, and its gradient wrt the logits."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target[:, None])
    grad = logp.exp().scatter_add(-1, target[:, None], torch.full_like(picked, -1.0))
    return -picked.sum(), grad.to(logits.dtype)


@functools.cache
def _addmm_into(out_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch can add a `dtype` product into an `out_dtype` matrix in one cuBLAS call
    (`addmm(..., out_dtype=...)`: CUDA only; torch 2.8-2.9 have it but reject an `out_dtype` input)."""
    if device.type != "cuda" or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    out, a = torch.zeros(2, 2, dtype=out_dtype, device=device), torch.ones(2, 2, dtype=dtype, device=device)
    try:
        with torch.autocast(device.type, enabled=False):
            torch.addmm(out, a, a, out_dtype=out_dtype, out=out)
    except RuntimeError:
        return False
    return bool((out == 2).all())


def accumulate_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, `out` fp32 and a, b in the matmul dtype. On CUDA the matmul accumulates into
    `out` (beta = 1) in fp32: no bf16 product is written and read back by a separate add (for the
    LM head's gradient, [V, C] per chunk: ~3.4 ms a step-2 update at the 0.5B shape), and each
    chunk's product is not rounded to bf16 before it is summed."""
    if out.dtype != a.dtype and _addmm_into(out.dtype, a.dtype, a.device):
        with torch.autocast(a.device.type, enabled=False):  # autocast would cast `out` to bf16
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(a @ b)


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, terms: Terms, chunk: int) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        # Cast once, not in each chunk's three matmuls: the head is the largest weight (V x C).
        w = to_matmul_dtype(weight)
        for i in range(0, hidden.shape[0], chunk):
            rows = slice(i, i + chunk)
            h = to_matmul_dtype(hidden[rows])
            loss, dlogits = terms(rows, h @ w.T)  # bf16 logits under autocast
            total += loss
            grad_hidden[rows] = dlogits @ w  # dlogits come in the logits' dtype: h's and w's
            accumulate_product(grad_weight, dlogits.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total, None, None


def linear_loss(hidden: Tensor, weight: Tensor, terms: Terms, chunk: int) -> Tensor:
    """Sum over tokens of a loss of `hidden @ weight.T` ([N, C] @ [C, V]), `chunk` tokens at a time."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLoss.apply(hidden, weight, terms, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    w = to_matmul_dtype(weight)  # once, as in _LinearLoss
    for i in range(0, hidden.shape[0], chunk):
        rows = slice(i, i + chunk)
        total += terms(rows, to_matmul_dtype(hidden[rows]) @ w.T)[0]
    return total


def chunked_kl(
    student_hidden: Tensor,
    student_head: nn.Linear,
    teacher_hidden: Tensor,
    teacher_head: nn.Linear,
    chunk: int,
    compile: bool = False,
) -> Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions (temperature 1);
    `compile`: fuse each chunk's terms on CUDA (a Triton kernel)."""
    s, t = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    kl = fused_kl_terms if compile and s.is_cuda else kl_terms

    def terms(rows: slice, s_logits: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return kl(s_logits, t[rows] @ teacher_head.weight.T)

    return linear_loss(s, student_head.weight, terms, chunk) / s.shape[0]


def chunked_cross_entropy(
    hidden: Tensor, head: nn.Linear, input_ids: Tensor, chunk: int, compile: bool = False
) -> Tensor:
    """Mean next-token cross-entropy: position t predicts input_ids[t + 1]; `compile` as in chunked_kl."""
    h = hidden[:, :-1].flatten(0, 1)
    labels = input_ids[:, 1:].flatten()
    cross_entropy = maybe_compiled(cross_entropy_terms, h, compile)

    def terms(rows: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        return cross_entropy(logits, labels[rows])

    return linear_loss(h, head.weight, terms, chunk) / h.shape[0]
