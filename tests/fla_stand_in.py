"""A CPU stand-in for the parts of fla that radlads' custom ops (`radlads::rwkv7_chunk`,
`radlads::recurrence_fwd`) call.

fla's kernels need CUDA; the op's own machinery (schema, fake outputs, autograd registration, the
context it hands fla's Function, tracing through torch.compile) does not. The stand-in computes
with the PyTorch reference and saves what fla saves (intermediates of fla's shapes and dtypes,
filled with a marker when asked to keep them), so CPU tests check that machinery; GPU tests run
the same checks on fla itself.
"""

from __future__ import annotations

import concurrent.futures
import sys
import types

import torch

from radlads.kernels import fla_ops
from radlads.kernels.reference import recurrent_chunked

MARKER = 7.0


def _gate_bound_is_safe(lower_bound: float, chunk_size: int) -> bool:
    return lower_bound < 0 and abs(lower_bound) * (chunk_size // 2 + 1) * 1.4427 <= 124


def _fla_intermediates(q, v, chunk_size):
    B, T, H, K = q.shape
    f32 = torch.float32

    def per_token(width, dtype=q.dtype):
        return torch.full((B, T, H, width), MARKER, dtype=dtype)

    nt = -(-T // chunk_size)
    return [
        *(per_token(K, f32), per_token(K, f32)),  # gi, ge
        *(per_token(chunk_size), per_token(chunk_size), per_token(chunk_size, f32)),  # A_qk, A_qb, A_ak
        *(per_token(K) for _ in range(5)),  # qg, kg, ag, bg, w
        torch.full((B, nt, H, K, v.shape[-1]), MARKER, dtype=q.dtype),  # h
        torch.full_like(v, MARKER),  # v_new
        per_token(chunk_size, f32),  # A_ab_inv
    ]


class StandInFunction:
    """ChunkDPLRDeltaRuleFunction's forward/backward contract, computed by the reference."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, gk, scale, initial_state, output_final_state, **options):
        with torch.no_grad():
            y, _ = recurrent_chunked(q, gk, k, v, a, b, scale=scale)
        keep = options.get("disable_recompute", False)
        kept = _fla_intermediates(q, v, options["chunk_size"]) if keep else []
        ctx.save_for_backward(q, k, v, a, b, gk, initial_state, *kept)
        return y.to(q.dtype).contiguous(), None  # fla's outputs are contiguous

    @staticmethod
    def backward(ctx, dy, dht):
        q, k, v, a, b, gk, _, *kept = ctx.saved_tensors
        assert ctx.disable_recompute == bool(kept)
        assert all(float(x.flatten()[0]) == MARKER for x in kept), "kept intermediates lost on the way"

        def grads():
            # The op's backward runs below autograd's dispatch keys, thread-locally: a fresh thread
            # can differentiate the reference (fla needs nothing of the kind: it has its kernels).
            with torch.enable_grad():
                xs = [x.detach().requires_grad_() for x in (q, k, v, a, b, gk)]
                y, _ = recurrent_chunked(xs[0], xs[5], *xs[1:5], scale=ctx.scale)
                return torch.autograd.grad(y, xs, dy)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            dq, dk, dv, da, db, dgk = (g.contiguous() for g in pool.submit(grads).result())
        return (dq, dk, dv, da, db, dgk, None, None) + (None,) * 8


def _gla(r, k, v, gk, **state):
    """fla's chunk_gla / fused_recurrent_gla (the decay, gk, after v)."""
    return recurrent_chunked(r, gk, k, v, **state)


def _rwkv7(r, w, k, v, a, b, lower_bound=None, disable_recompute=False, **state):
    """fla's chunk_rwkv7 / fused_recurrent_rwkv7."""
    return recurrent_chunked(r, w, k, v, a, b, **state)


def _rwkv7_tilelang(q, k, v, a, b, gk, scale, lower_bound, chunk_size, disable_recompute):
    """fla's chunk_dplr_delta_rule_tilelang (differentiable here through the reference); its calls
    go to TILELANG_CALLS."""
    TILELANG_CALLS.append(dict(chunk_size=chunk_size, keep=disable_recompute, lower_bound=lower_bound))
    assert all(x.is_contiguous() for x in (q, k, v, a, b, gk)), "its kernels read dense strides"
    return recurrent_chunked(q, gk, k, v, a, b, scale=scale)


TILELANG_CALLS: list[dict] = []
_REGISTERED = False


def install(monkeypatch) -> None:
    """Make `import fla...` inside radlads.kernels.fla_ops find the stand-in, and let the ops run
    on CPU tensors (a CPU kernel for each: registered once, for the rest of the session, where
    nothing else calls them on a CPU)."""
    global _REGISTERED
    names = ("fla", "fla.ops", "fla.ops.generalized_delta_rule", "fla.ops.generalized_delta_rule.dplr")
    for name in (*names, "fla.ops.generalized_delta_rule.dplr.chunk", "fla.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    chunk = sys.modules["fla.ops.generalized_delta_rule.dplr.chunk"]
    chunk.gate_bound_is_safe, chunk.ChunkDPLRDeltaRuleFunction = _gate_bound_is_safe, StandInFunction
    sys.modules["fla.utils"].TRITON_ABOVE_3_4_0 = True
    tilelang = types.ModuleType("fla.ops.generalized_delta_rule.dplr.backends.tilelang.chunk")
    tilelang.chunk_dplr_delta_rule_tilelang = _rwkv7_tilelang
    monkeypatch.setitem(sys.modules, tilelang.__name__, tilelang)
    TILELANG_CALLS.clear()
    for rule, function in (("gla", _gla), ("rwkv7", _rwkv7)):
        module = types.ModuleType(f"fla.ops.{rule}")
        setattr(module, f"chunk_{rule}", function)
        setattr(module, f"fused_recurrent_{rule}", function)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    if not _REGISTERED:
        for op in (fla_ops._rwkv7_chunk, fla_ops._rwkv7_chunk_bwd, fla_ops._recurrence_fwd):
            op.register_kernel("cpu")(op._init_fn)
        _REGISTERED = True
