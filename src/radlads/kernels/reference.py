"""Pure-PyTorch reference for the two recurrences, in fla's state layout.

State h is [B, H, K, V] (fla's convention; the SPEC's S is its transpose). One step:

    h_t = diag(w_t) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T,      y_t = scale * h_t^T r_t

With a = b = None this is the diagonal-decay (GLA / RWKV-6 without bonus) rule; with
a = -kappa, b = kappa * iclr it is the RWKV-7 delta rule. Everything is computed in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _initial_state(r: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    B, _, H, K = r.shape
    if initial_state is None:
        return r.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    return initial_state.float()


def recurrent_loop(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence one token at a time: slow, obviously right, the ground truth of the tests."""
    h = _initial_state(r, v, initial_state)
    ys = []
    for t in range(r.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()
        h_next = log_w[:, t].float().exp()[..., None] * h + kt[..., None] * vt[..., None, :]
        if a is not None:
            removed = (a[:, t].float()[..., None] * h).sum(-2, keepdim=True)
            h_next = h_next + b[:, t].float()[..., None] * removed
        h = h_next
        ys.append(torch.einsum("bhk,bhkv->bhv", r[:, t].float() * scale, h))
    y = torch.stack(ys, dim=1).to(v.dtype)
    return y, (h if output_final_state else None)


def _pairwise_decay(c_to: Tensor, c_from: Tensor, strict: bool) -> Tensor:
    """exp(c_to[t] - c_from[s]) on the causal triangle, 0 elsewhere: [..., C, C, K].

    Masking before exp keeps every exponent <= 0, so strong decays underflow to 0
    instead of overflowing as a ratio of cumulative products would.
    """
    C = c_to.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=c_to.device).tril(-1 if strict else 0)
    diff = c_to[..., :, None, :] - c_from[..., None, :, :]
    return diff.masked_fill(~mask[:, :, None], float("-inf")).exp()


def _pair(x: Tensor, decay: Tensor, z: Tensor) -> Tensor:
    """sum_k x[t,k] decay[t,s,k] z[s,k]: the decayed inner products inside a chunk, [..., C, C]."""
    return torch.einsum("...tk,...tsk,...sk->...ts", x, decay, z)


def _chunk_step(h, r, log_w, k, v, a, b, scale):
    """Advance the state over one chunk: inputs are [B, H, C, K|V] fp32; returns (y, h_end)."""
    c = log_w.cumsum(-2)  # log of the decay from the chunk start up to and including t
    c_excl = c - log_w  # ... up to t-1
    to_end = (c[..., -1:, :] - c).exp()  # decay from t to the chunk end
    decay_out = _pairwise_decay(c, c, strict=False)
    r = r * scale
    y = (r * c.exp()) @ h + _pair(r, decay_out, k) @ v
    h_end = c[..., -1, :].exp()[..., None] * h + (to_end * k).transpose(-1, -2) @ v
    if a is None:
        return y, h_end
    # u_t = a_t^T h_{t-1} depends on earlier u's inside the chunk: a unit-lower-triangular system.
    decay_in = _pairwise_decay(c_excl, c, strict=True)
    rhs = (a * c_excl.exp()) @ h + _pair(a, decay_in, k) @ v
    eye = torch.eye(r.shape[-2], device=r.device, dtype=r.dtype)
    u = torch.linalg.solve_triangular(eye - _pair(a, decay_in, b), rhs, upper=False, unitriangular=True)
    y = y + _pair(r, decay_out, b) @ u
    h_end = h_end + (to_end * b).transpose(-1, -2) @ u
    return y, h_end


def recurrent_chunked(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor | None]:
    """Same function as `recurrent_loop`, a chunk of tokens per step (differentiable, CPU-friendly)."""
    T = r.shape[1]
    pad = (-T) % chunk_size
    # Padding with log_w = 0 and zero k/v/a/b leaves the state untouched, so the final state is exact.
    tensors = [x if x is None else _to_chunks(x, pad, chunk_size) for x in (r, log_w, k, v, a, b)]
    h = _initial_state(r, v, initial_state)
    ys = []
    for n in range(tensors[0].shape[2]):
        rn, wn, kn, vn, an, bn = (x if x is None else x[:, :, n] for x in tensors)
        y, h = _chunk_step(h, rn, wn, kn, vn, an, bn, scale)
        ys.append(y)
    y = torch.cat(ys, dim=2).transpose(1, 2)[:, :T].to(v.dtype)
    return y, (h if output_final_state else None)


def _to_chunks(x: Tensor, pad: int, chunk_size: int) -> Tensor:
    """[B, T, H, D] -> [B, H, T/chunk, chunk, D] in fp32, zero-padded at the end."""
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
    B, T, H, D = x.shape
    return x.transpose(1, 2).reshape(B, H, T // chunk_size, chunk_size, D)
