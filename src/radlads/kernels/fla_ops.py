"""flash-linear-attention's Triton kernels behind the reference's signature (CUDA only).

Imported lazily by the dispatcher: on a CPU install this module is never loaded.
"""

from __future__ import annotations

import torch
from fla.ops.gla import chunk_gla, fused_recurrent_gla
from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
from torch import Tensor

# The fused recurrent kernel wins for decoding (a handful of tokens, no autograd); the chunked
# kernel for prefill and training. fla's fused recurrent ops have no backward.
_RECURRENT_MAX_TOKENS = 16


def _use_recurrent(r: Tensor) -> bool:
    return r.shape[1] <= _RECURRENT_MAX_TOKENS and not torch.is_grad_enabled()


def dplr(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    log_w_min: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    # Triton dots need one operand dtype. Under autocast use autocast's, as a matmul would: with
    # fp32 master weights the fp32 embeddings, RoPE tables and parameters promote r, k, v, a, b to
    # fp32, which would run the recurrence in fp32 (slower, and other kernels to compile).
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else r.dtype
    r, k, v, log_w = r.to(dtype), k.to(dtype), v.to(dtype), log_w.to(dtype)
    if initial_state is not None:
        initial_state = initial_state.float()
    if a is None:
        if _use_recurrent(r):
            return fused_recurrent_gla(
                r,
                k,
                v,
                gk=log_w,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
            )
        return chunk_gla(
            r, k, v, log_w, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if _use_recurrent(r):
        return fused_recurrent_rwkv7(r, log_w, k, v, a.to(dtype), b.to(dtype), **state)
    # fla picks its chunk size (64 with a safe floor, else 16) and tensor-core scheme from lower_bound.
    return chunk_rwkv7(r, log_w, k, v, a.to(dtype), b.to(dtype), lower_bound=log_w_min, **state)
