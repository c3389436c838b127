"""The two recurrences of the students, one signature, several backends.

    y, final_state = rwkv7_recurrence(r, log_w, k, v, a, b, scale=..., initial_state=..., output_final_state=...)
    y, final_state = gla_recurrence(r, log_w, k, v, scale=..., initial_state=..., output_final_state=...)

Tensors are [B, T, H, K] (v: [B, T, H, V]); states are fp32 [B, H, K, V]. Backends:
"fla" (Triton, CUDA), "chunked" (PyTorch, differentiable, any device), "loop" (PyTorch,
one token at a time: ground truth). "auto" picks fla on CUDA when installed, else chunked.
The RADLADS_KERNEL_BACKEND environment variable overrides "auto". One exception: a single token
traced by torch.compile without autograd (compiled decoding) always takes the PyTorch per-token
step, whatever the backend, so that the step stays one graph.

kl_div (imported where used: it needs Triton) holds step 2's loss terms as one Triton kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from . import fla_ops
from .reference import recurrent_chunked, recurrent_loop

BACKENDS = ("auto", "fla", "chunked", "loop")


@functools.cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def resolve_backend(backend: str, on_cuda: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("RADLADS_KERNEL_BACKEND", "auto")
    if backend == "auto":
        return "fla" if on_cuda and fla_available() else "chunked"
    if backend == "fla" and not (on_cuda and fla_available()):
        raise RuntimeError(
            "the 'fla' kernel backend needs a CUDA tensor and flash-linear-attention "
            "(pip install 'radlads[cuda]'); use backend 'chunked' on CPU"
        )
    return backend


def _dispatch(backend: str, on_cuda: bool):
    name = resolve_backend(backend, on_cuda)
    if name == "fla":
        return fla_ops.dplr
    return recurrent_chunked if name == "chunked" else recurrent_loop


# Decided once per compiled graph (Dynamo calls it while tracing and keeps the answer): the backend
# is configuration, and the environment lookups behind it are nothing Dynamo could trace.
@torch.compiler.assume_constant_result
def _fla_runs(backend: str, on_cuda: bool) -> bool:
    return resolve_backend(backend, on_cuda) == "fla"


# fla's autotuned Triton kernels are not for Dynamo to trace: a compiled caller breaks its graph
# here and runs the kernel as it is. With fla, only calls with autograd that no custom op covers
# get here (GLA, RWKV-7 with a state); fla_ops.rwkv7_chunk (training's RWKV-7) and
# radlads::recurrence_fwd (every call without autograd) are ops that a compiled graph keeps whole.
@torch.compiler.disable
def _run(backend: str, r, log_w, k, v, *ab, log_w_min: float | None = None, recompute: bool = True, **kwargs):
    op = _dispatch(backend, r.is_cuda)
    if op is recurrent_chunked and r.shape[1] == 1:
        # A decoding step: building a one-token chunk's matrices (triangular solves and all)
        # costs more than the one update they amount to.
        op = recurrent_loop
    if op in (recurrent_chunked, recurrent_loop):
        # The references keep what autograd keeps (no `recompute`), and check the floor's promise,
        # on the CPU only: on a GPU the check would stall the host every layer (and break
        # CUDA-graph capture).
        if log_w_min is not None and not log_w.is_cuda and (log_w < log_w_min).any():
            raise ValueError(f"log_w falls below log_w_min={log_w_min}, the floor its caller declared")
        return op(r, log_w, k, v, *ab, **kwargs)
    if log_w_min is not None:
        kwargs["log_w_min"] = log_w_min
    if not recompute:
        kwargs["recompute"] = False
    return op(r, log_w, k, v, *ab, **kwargs)


def _one_token_traced(r: Tensor) -> bool:
    """One token, no autograd, under torch.compile (compiled decoding): the per-token update in
    PyTorch fuses into the caller's graph, where fla's kernel would break it into one graph per layer."""
    return r.shape[1] == 1 and not torch.is_grad_enabled() and torch.compiler.is_compiling()


def _without_autograd(
    r, log_w, k, v, a=None, b=None, *, scale, initial_state, output_final_state, log_w_min=None
) -> tuple[Tensor, Tensor | None]:
    """fla without autograd (prefill, evaluation) through the custom op radlads::recurrence_fwd,
    which a compiled layer traces as one node: no graph break at the recurrence."""
    y, final = torch.ops.radlads.recurrence_fwd(r, log_w, k, v, a, b, scale, initial_state, log_w_min)
    return y, final if output_final_state else None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives matmuls on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def kernel_inputs(*tensors: Tensor) -> list[Tensor]:
    """The inputs in one dtype, as kernels' dots need: autocast's under autocast, as a matmul would
    take (fp32 master weights, embeddings and RoPE tables promote some inputs to fp32, which would
    run fla's slower fp32 kernels), else the first's. Callers compiled with torch.compile should
    cast with this themselves, in the frame that computes the inputs: the kernel call can be a
    graph break (fla's GLA or RWKV-7 with a state, under autograd), and Dynamo compiles a function
    entered before a break as a graph of its own, so casts made inside it run as kernels of their
    own instead of fusing into the ones that compute the inputs. (Already in the dtype, the cast
    is free.)"""
    dtype = autocast_dtype(tensors[0].device.type) or tensors[0].dtype
    return [x.to(dtype) for x in tensors]


def rwkv7_recurrence(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    log_w_min: float | None = None,
    recompute: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """RWKV-7 delta rule: h_t = diag(w_t) h + b_t (a_t^T h) + k_t v_t^T, y_t = scale h_t^T r_t.

    `log_w_min`: a floor the caller guarantees for log_w. fla's chunked kernel then runs 64-token
    chunks with tensor-core intra-chunk products (the floor bounds their exponents) instead of
    16-token chunks; the reference backends check the promise instead.
    `recompute`: fla's chunked kernel recomputes its forward's intermediates in backward (least
    memory). False keeps them from the forward instead: the backward skips most of a forward's
    work, and each call holds ~2.2 KB more per token and head (at K = V = 64) until its backward."""
    inputs = kernel_inputs(r, log_w, k, v, a, b)
    state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if _one_token_traced(r):
        return recurrent_loop(*inputs, **state)
    if _fla_runs(backend, r.is_cuda):
        if not torch.is_grad_enabled():
            return _without_autograd(*inputs, **state, log_w_min=log_w_min)
        if initial_state is None and not output_final_state:
            return fla_ops.rwkv7_chunk(*inputs, scale=scale, log_w_min=log_w_min, recompute=recompute), None
    return _run(backend, *inputs, log_w_min=log_w_min, recompute=recompute, **state)


def gla_recurrence(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Diagonal-decay rule (GLA; RWKV-6 with u = 0): h_t = diag(w_t) h + k_t v_t^T, y_t = scale h_t^T r_t."""
    inputs = kernel_inputs(r, log_w, k, v)
    state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if _one_token_traced(r):
        return recurrent_loop(*inputs, **state)
    if _fla_runs(backend, r.is_cuda) and not torch.is_grad_enabled():
        return _without_autograd(*inputs, **state)
    return _run(backend, *inputs, **state)


__all__ = [
    "BACKENDS",
    "autocast_dtype",
    "fla_available",
    "gla_recurrence",
    "kernel_inputs",
    "resolve_backend",
    "rwkv7_recurrence",
]
