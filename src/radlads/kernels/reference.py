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


# Inside a chunk the decay from position s to t factors around a middle position m as
# exp(c_t - m) * exp(m - c_s), which turns the chunk's pairwise products into matmuls. Each factor
# lies within exp(+-span), span being the chunk's summed -log_w; past this bound a factor could
# leave fp32's normal range, and the products take the masked pairwise form instead (exact for
# any decay, but C x C x K elementwise work and memory).
MAX_FACTORED_SPAN = 60.0


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
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Same function as `recurrent_loop`, a chunk of tokens per step (differentiable, CPU-friendly).

    Everything inside a chunk is computed for all chunks at once; only the state is carried from
    one chunk to the next, by two small matmuls per chunk:
        y_n = Q_n h_n + Y_n,    h_{n+1} = diag(w_n) h_n + P_n h_n + D_n
    """
    T, dtype = r.shape[1], v.dtype
    chunk_size = max(1, min(chunk_size, T))  # a short input (a decoding step) is its own chunk, unpadded
    pad = (-T) % chunk_size
    h = _initial_state(r, v, initial_state)
    # Padding with log_w = 0 and zero k/v/a/b leaves the state untouched, so the final state is exact.
    r, log_w, k, v, a, b = (
        x if x is None else _to_chunks(x, pad, chunk_size) for x in (r, log_w, k, v, a, b)
    )
    with torch.autocast(r.device.type, enabled=False):  # fp32 throughout, as the loop
        Q, Y, P, D, log_w_end = _chunk_terms(r * scale, log_w, k, v, a, b)
        w_end = log_w_end.exp().transpose(-1, -2)  # [B, H, N, K, 1]: it scales the state's rows
        ys = []
        for n in range(Q.shape[2]):
            ys.append(Q[:, :, n] @ h)
            h_next = w_end[:, :, n] * h + D[:, :, n]
            h = h_next if P is None else h_next + P[:, :, n] @ h
        y = torch.stack(ys, dim=2) + Y  # [B, H, N, C, V]
    y = y.flatten(2, 3).transpose(1, 2)[:, :T].to(dtype)
    return y, (h if output_final_state else None)


def _chunk_terms(r, log_w, k, v, a, b):
    """The per-chunk matrices of `recurrent_chunked` from [B, H, N, C, K|V] fp32 inputs."""
    c = log_w.cumsum(-2)  # log of the decay from the chunk start up to and including t
    c_excl = c - log_w  # ... up to t-1
    c_end = c[..., -1:, :]
    to_end = (c_end - c).exp()  # decay from t to the chunk end
    factored = _max_span(log_w) <= MAX_FACTORED_SPAN
    A_rk = _decayed_products(r, k, c, c, strict=False, factored=factored)
    Q, Y = r * c.exp(), A_rk @ v
    D = (to_end * k).transpose(-1, -2) @ v
    if a is None:
        return Q, Y, None, D, c_end
    # u_t = a_t^T h_{t-1} depends on earlier u's inside the chunk: a unit-lower-triangular system
    # (I - A_ab) u = a exp(c_excl) h + A_ak v, solved once for the h-part (W) and the v-part (U).
    A_ab = _decayed_products(a, b, c_excl, c, strict=True, factored=factored)
    A_ak = _decayed_products(a, k, c_excl, c, strict=True, factored=factored)
    A_rb = _decayed_products(r, b, c, c, strict=False, factored=factored)
    eye = torch.eye(r.shape[-2], device=r.device, dtype=r.dtype)
    lower = eye - A_ab
    W = torch.linalg.solve_triangular(lower, a * c_excl.exp(), upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(lower, A_ak @ v, upper=False, unitriangular=True)
    b_to_end = (to_end * b).transpose(-1, -2)
    return Q + A_rb @ W, Y + A_rb @ U, b_to_end @ W, D + b_to_end @ U, c_end


def _max_span(log_w: Tensor) -> float:
    return float(-log_w.detach().sum(-2).min()) if log_w.numel() else 0.0


def _decayed_products(x: Tensor, z: Tensor, c_x: Tensor, c_z: Tensor, strict: bool, factored: bool) -> Tensor:
    """sum_k x[t,k] exp(c_x[t,k] - c_z[s,k]) z[s,k] on the causal triangle, 0 elsewhere: [..., C, C]."""
    C = x.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if not factored:
        decay = (c_x[..., :, None, :] - c_z[..., None, :, :]).masked_fill(~mask[:, :, None], float("-inf"))
        return torch.einsum("...tk,...tsk,...sk->...ts", x, decay.exp(), z)
    middle = c_z[..., C // 2 : C // 2 + 1, :]
    products = (x * (c_x - middle).exp()) @ (z * (middle - c_z).exp()).transpose(-1, -2)
    return products.masked_fill(~mask, 0.0)


def _to_chunks(x: Tensor, pad: int, chunk_size: int) -> Tensor:
    """[B, T, H, D] -> [B, H, T/chunk, chunk, D] in fp32, zero-padded at the end."""
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)) if pad else x.float()
    B, T, H, D = x.shape
    return x.transpose(1, 2).reshape(B, H, T // chunk_size, chunk_size, D)
