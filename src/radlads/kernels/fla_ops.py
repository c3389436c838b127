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
    recompute: bool = True,
) -> tuple[Tensor, Tensor | None]:
    # r, log_w, k, v, a, b arrive in one dtype (radlads.kernels casts them); the state stays fp32.
    # `recompute` applies to RWKV-7 only: fla's GLA kernels have no such switch.
    if initial_state is not None:
        initial_state = initial_state.float()
    state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if a is None:
        if _use_recurrent(r):
            return fused_recurrent_gla(r, k, v, gk=log_w, **state)
        return chunk_gla(r, k, v, log_w, **state)
    if _use_recurrent(r):
        return fused_recurrent_rwkv7(r, log_w, k, v, a, b, **state)
    # fla picks its chunk size (64 with a safe floor, else 16) and tensor-core scheme from lower_bound.
    return chunk_rwkv7(r, log_w, k, v, a, b, lower_bound=log_w_min, disable_recompute=not recompute, **state)
