"""flash-linear-attention's kernels behind the reference's signature (CUDA only): its Triton kernels,
and for training's RWKV-7 call its TileLang ones where tilelang is installed and fla takes the call.

fla is imported inside the functions that launch its kernels, so this module (and the custom op
it defines) loads on a CPU install too; nothing here runs there.

Training's RWKV-7 call is a PyTorch custom op (`radlads::rwkv7_chunk`, with its backward as a
second op), and so is every call without autograd (`radlads::recurrence_fwd`: prefill and
evaluation, both rules, with a state in and out): torch.compile sees one opaque node instead of
fla's Python, so a compiled decoder layer stays one graph across the recurrence. Called from
inside a compiled layer, fla's own entry point is a graph break: Dynamo leaves the graph, fla's
dispatch runs, a resume function enters a second graph, and the host pays that per layer and
direction, which left step 2's forward at the edge of host-bound on an H100 (docs/benchmarks.md,
fifth run).
"""

import functools

import torch
from torch import Tensor

# The fused recurrent kernel wins for decoding (a handful of tokens, no autograd); the chunked
# kernel for prefill and training (but see fp32 GLA in dplr). fla's fused recurrent ops have no
# backward.
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
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    if initial_state is not None:
        initial_state = initial_state.float()
    state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if a is None:
        # fla 0.6.0's chunk_gla failed in fp32 on an H100 ("misaligned address" while autotuning,
        # K = 16 and 32, Triton's default dots; bf16 ran, and K = 64 with IEEE dots passed): without
        # autograd, fp32 takes the recurrent kernel, slower but sure (fp32 serves checks, not speed).
        if _use_recurrent(r) or (r.dtype == torch.float32 and not torch.is_grad_enabled()):
            return fused_recurrent_gla(r, k, v, gk=log_w, **state)
        return chunk_gla(r, k, v, log_w, **state)
    if _use_recurrent(r):
        return fused_recurrent_rwkv7(r, log_w, k, v, a, b, **state)
    # fla picks its chunk size (64 with a safe floor, else 16) and tensor-core scheme from lower_bound.
    return chunk_rwkv7(r, log_w, k, v, a, b, lower_bound=log_w_min, disable_recompute=not recompute, **state)


def rwkv7_chunk(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    log_w_min: float | None = None,
    recompute: bool = True,
) -> Tensor:
    """fla's chunked RWKV-7 (as `dplr`, from a zero state, no final state) as custom ops that
    torch.compile traces through; y only. Intermediates are kept only for a backward to come.

    Where fla's TileLang backend is installed and takes the call (`tilelang_chunk_size`), its
    kernels run: on an H100 at T = 512 they took 4.93 ms forward and backward against the Triton
    kernels' 5.72 ms (docs/benchmarks.md). They are fla's own custom ops, so a compiled layer stays
    one graph either way."""
    keep = not recompute and torch.is_grad_enabled()
    chunk_size = tilelang_chunk_size(
        r.shape[0], r.shape[2], r.shape[3], v.shape[3], r.dtype, r.device, log_w_min
    )
    if chunk_size is not None:
        from fla.ops.generalized_delta_rule.dplr.backends.tilelang.chunk import chunk_dplr_delta_rule_tilelang

        # Its kernels read dense strides (fla's Triton entry point makes the inputs contiguous, this
        # one does not); the mixers' inputs can be column slices of one fused matmul's output.
        r, log_w, k, v, a, b = (x.contiguous() for x in (r, log_w, k, v, a, b))
        qkv = dict(q=r, k=k, v=v, a=a, b=b, gk=log_w, scale=scale, lower_bound=log_w_min)
        return chunk_dplr_delta_rule_tilelang(**qkv, chunk_size=chunk_size, disable_recompute=keep)[0]
    return torch.ops.radlads.rwkv7_chunk(r, log_w, k, v, a, b, scale, log_w_min, keep)[0]


# Decided once per compiled graph (Dynamo calls it while tracing and keeps the answer), as
# configuration: what it reads (fla's verifier, the device's properties) is nothing to trace.
@torch.compiler.assume_constant_result
def tilelang_chunk_size(
    batch: int, heads: int, K: int, V: int, dtype: torch.dtype, device: torch.device, log_w_min: float | None
) -> int | None:
    """The chunk size at which fla's TileLang RWKV-7 kernels take a training call of this shape,
    or None where they take none: tilelang or nvcc missing, FLA_TILELANG=0, no decay floor, or
    fla's verifier rejecting every size (it turns down the sizes, head dims and grids it measured
    slower than its Triton kernels, e.g. 64-token chunks on an H100 and grids under half the
    GPU's SMs). The larger of 64 and 32 that it takes."""
    return _tilelang_chunk_size(batch, heads, K, V, dtype, device, log_w_min)


@functools.cache  # per shape and process: FLA_TILELANG is read once
def _tilelang_chunk_size(
    batch: int, heads: int, K: int, V: int, dtype: torch.dtype, device: torch.device, log_w_min: float | None
) -> int | None:
    if log_w_min is None or device.type != "cuda":
        return None
    try:
        from fla.ops.generalized_delta_rule.dplr.backends.tilelang import DPLRTileLangBackend
    except ImportError:  # an fla without the backend
        return None
    backend = DPLRTileLangBackend()
    if not (backend.is_available() and backend.is_enabled()):
        return None
    # The verifier reads shapes, dtypes and the device, never values: one token stands for T.
    q, v = (
        torch.empty(batch, 1, heads, K, dtype=dtype, device=device),
        torch.empty(batch, 1, heads, V, dtype=dtype, device=device),
    )
    for chunk_size in (64, 32):
        accepted, _ = backend.chunk_dplr_delta_rule_verifier(
            q, q, v, q, q, q, lower_bound=log_w_min, chunk_size=chunk_size
        )
        if accepted:
            return chunk_size
    return None


# --------------------------------------------------------------------------- the custom ops


# radlads::recurrence_fwd: `dplr` without autograd, from the initial state (zeros where None), to
# y and the final state; callers: radlads.kernels, for every fla call without autograd.
@torch.library.custom_op("radlads::recurrence_fwd", mutates_args=(), device_types="cuda")
def _recurrence_fwd(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    log_w_min: float | None,
) -> tuple[Tensor, Tensor]:
    y, state = dplr(r, log_w, k, v, a, b, scale, initial_state, True, log_w_min)
    return y.contiguous(), state.float()


@_recurrence_fwd.register_fake
def _(r, log_w, k, v, a, b, scale, initial_state, log_w_min):
    B, T, H, K = r.shape
    return r.new_empty(B, T, H, v.shape[-1]), r.new_empty(B, H, K, v.shape[-1], dtype=torch.float32)


#
# radlads::rwkv7_chunk: fla's autograd.Function (ChunkDPLRDeltaRuleFunction) runs inside it: its
# forward with a context that records what it saves, its backward with a context that hands those
# tensors back, so the ops run exactly fla's Triton kernel sequence (fla's backend dispatch, which
# would pick its TileLang kernels where tilelang is installed, is not consulted). Tensors fla saves
# beyond the op's inputs (only when it keeps its intermediates) leave the forward op as extra
# outputs, in fla's order.

_FLA_SAVES_INPUTS = 7  # q, k, v, a, b, gk, initial_state: the op's inputs (no initial state here)


def _chunking(lower_bound: float | None) -> tuple[int, bool]:
    """(chunk size, tensor-core "safe gate" scheme) as fla's chunk_rwkv7 picks them."""
    from fla.ops.generalized_delta_rule.dplr.chunk import gate_bound_is_safe
    from fla.utils import TRITON_ABOVE_3_4_0

    if lower_bound is not None and lower_bound >= 0:
        raise ValueError(f"log_w_min must be negative (a log-decay floor), got {lower_bound}")
    safe = lower_bound is not None and gate_bound_is_safe(lower_bound, 64)
    chunk_size = 64 if TRITON_ABOVE_3_4_0 and safe else 16
    return chunk_size, lower_bound is not None and gate_bound_is_safe(lower_bound, chunk_size)


class _Context:
    """Stands in for autograd's ctx around fla's Function: keeps what fla sets and saves."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@torch.library.custom_op("radlads::rwkv7_chunk", mutates_args=(), device_types="cuda")
def _rwkv7_chunk(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    lower_bound: float | None,
    keep: bool,
) -> list[Tensor]:
    from fla.ops.generalized_delta_rule.dplr.chunk import ChunkDPLRDeltaRuleFunction

    chunk_size, safe_gate = _chunking(lower_bound)
    ctx = _Context()
    y, _ = ChunkDPLRDeltaRuleFunction.forward(
        ctx,
        q=r,
        k=k,
        v=v,
        a=a,
        b=b,
        gk=log_w,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        safe_gate=safe_gate,
        lower_bound=lower_bound,
        chunk_size=chunk_size,
        disable_recompute=keep,
    )
    return [y, *ctx.saved_tensors[_FLA_SAVES_INPUTS:]]


@_rwkv7_chunk.register_fake
def _(r, log_w, k, v, a, b, scale, lower_bound, keep):
    B, T, H, K = r.shape
    V = v.shape[-1]
    chunk_size, _ = _chunking(lower_bound)
    y = r.new_empty(B, T, H, V)
    if not keep:
        return [y]
    f32 = torch.float32

    def per_token(width, dtype=r.dtype):
        return r.new_empty(B, T, H, width, dtype=dtype)

    # fla's order: gi, ge, A_qk, A_qb, A_ak, qg, kg, ag, bg, w, h, v_new, A_ab_inv
    gi, ge = per_token(K, f32), per_token(K, f32)
    A_qk, A_qb, A_ak = per_token(chunk_size), per_token(chunk_size), per_token(chunk_size, f32)
    qg, kg, ag, bg, w = (per_token(K) for _ in range(5))
    h = r.new_empty(B, -(-T // chunk_size), H, K, V)  # ceil, for symbolic T too
    v_new = v.new_empty(B, T, H, V)
    return [y, gi, ge, A_qk, A_qb, A_ak, qg, kg, ag, bg, w, h, v_new, per_token(chunk_size, f32)]


@torch.library.custom_op("radlads::rwkv7_chunk_bwd", mutates_args=(), device_types="cuda")
def _rwkv7_chunk_bwd(
    dy: Tensor,
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    kept: list[Tensor],
    scale: float,
    lower_bound: float | None,
) -> list[Tensor]:
    from fla.ops.generalized_delta_rule.dplr.chunk import ChunkDPLRDeltaRuleFunction

    chunk_size, safe_gate = _chunking(lower_bound)
    inputs = (x.contiguous() for x in (r, k, v, a, b, log_w))  # fla's forward saved them contiguous
    ctx = _Context(
        saved_tensors=(*inputs, None, *kept),
        disable_recompute=bool(kept),
        chunk_size=chunk_size,
        safe_gate=safe_gate,
        scale=scale,
        cu_seqlens=None,
        chunk_indices=None,
        cp_context=None,
        _fwd_used_autocast=False,  # read by torch.amp.custom_bwd
        _dtype=r.dtype,
    )
    dr, dk, dv, da, db, dlog_w = ChunkDPLRDeltaRuleFunction.backward(ctx, dy, None)[:6]
    return [dr, dlog_w, dk, dv, da, db]


@_rwkv7_chunk_bwd.register_fake
def _(dy, r, log_w, k, v, a, b, kept, scale, lower_bound):
    return [x.new_empty(x.shape) for x in (r, log_w, k, v, a, b)]


def _setup_context(ctx, inputs, output):
    r, log_w, k, v, a, b, scale, lower_bound, _ = inputs
    kept = output[1:]
    ctx.mark_non_differentiable(*kept)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(r, log_w, k, v, a, b, *kept)
    ctx.options = (scale, lower_bound)


def _backward(ctx, grads):
    r, log_w, k, v, a, b, *kept = ctx.saved_tensors
    inputs_grads = torch.ops.radlads.rwkv7_chunk_bwd(grads[0], r, log_w, k, v, a, b, kept, *ctx.options)
    return (*inputs_grads, None, None, None)


_rwkv7_chunk.register_autograd(_backward, setup_context=_setup_context)
