"""Softmax attention kept from the teacher in hybrid students (`softmax_layers`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import TeacherProjections


def attention_mask_4d(attention_mask: Tensor | None, T: int, S: int, device) -> Tensor | None:
    """Boolean [B|1, 1, T, S] mask: causal (queries are the last T of S positions) and padding-aware.

    Each query may always see itself, so rows of left padding never become all-masked (NaN).
    """
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    allowed = j <= i
    if attention_mask is None:
        return allowed[None, None]
    allowed = allowed[None] & attention_mask[:, None, :].bool()
    return (allowed | (j == i)[None])[:, None]


@dataclass
class StaticKV:
    """A softmax layer's keys and values in buffers of fixed capacity, for the captured decoding
    step (radlads.models.graphs), whose tensors may not change shape. A step writes its token's key
    and value at position `length` (a device scalar, so one graph serves every length up to the
    capacity C) and attends to the positions `valid` ([B, C], shared by the model's softmax layers)
    marks: each row's own tokens, never padding or slots not yet written. The buffers are
    head-major, [B, H_kv, C, N], so that attention reads each KV head once, as one batched matmul
    for all the query heads that share it; a cache between steps holds [B, T, H_kv, N] views."""

    keys: Tensor
    values: Tensor
    length: Tensor
    valid: Tensor

    @classmethod
    def like(cls, keys: Tensor, capacity: int, length: Tensor, valid: Tensor) -> StaticKV:
        """Empty buffers for keys like `keys` ([B, T, H_kv, N], as a cache holds them)."""
        B, _, H, N = keys.shape
        return cls(keys.new_zeros(B, H, capacity, N), keys.new_zeros(B, H, capacity, N), length, valid)

    def load(self, state: tuple[Tensor, Tensor]) -> None:
        """Copy a cache's keys and values into the first positions."""
        n = state[0].shape[1]
        self.keys[:, :, :n].copy_(state[0].transpose(1, 2))
        self.values[:, :, :n].copy_(state[1].transpose(1, 2))

    def append(self, k: Tensor, v: Tensor) -> None:
        at = self.length.view(1)
        self.keys.index_copy_(2, at, k.transpose(1, 2))
        self.values.index_copy_(2, at, v.transpose(1, 2))

    def filled(self, length: int) -> tuple[Tensor, Tensor]:
        """The first `length` positions as [B, length, H_kv, N] views, as a cache holds them."""
        return self.keys[:, :, :length].transpose(1, 2), self.values[:, :, :length].transpose(1, 2)

    def holds(self, state: tuple[Tensor, Tensor]) -> bool:
        """Whether `state` is such a view of these buffers (so they already hold it)."""
        return state[0].data_ptr() == self.keys.data_ptr() and state[1].data_ptr() == self.values.data_ptr()


class SoftmaxAttention(TeacherProjections):
    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: tuple[Tensor, Tensor] | None = None,
        v_first: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """y, v_first passed through, and where `use_cache` the keys and values so far (`state`, the
        earlier ones, [B, S, H_kv, N] each, with x's appended)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, position_embeddings)
        if isinstance(state, StaticKV):
            return self.attend_static(q, k, v, state), v_first, state
        if state is not None:
            k, v = torch.cat([state[0], k], dim=1), torch.cat([state[1], v], dim=1)
        state = (k, v) if use_cache else None
        k, v = self.expand_kv(k), self.expand_kv(v)
        S = k.shape[1]
        if attention_mask is None and S == T:
            mask, causal = None, True
        else:
            mask, causal = attention_mask_4d(attention_mask, T, S, x.device), False
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), v_first, state

    def attend_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticKV) -> Tensor:
        """One decoding step on fixed-capacity buffers, attending over all C positions through the
        mask. Query head h reads KV head h // G (as HF's repeat_kv), here without repeating them."""
        state.append(k, v)
        B, T, H, N = q.shape
        q = q.transpose(1, 2).reshape(B, self.num_kv_heads, H // self.num_kv_heads * T, N)
        scores = (q @ state.keys.transpose(-1, -2)).float() * N**-0.5
        scores = scores.masked_fill(~state.valid[:, None, None, :], float("-inf"))
        y = scores.softmax(-1).to(state.values.dtype) @ state.values
        return self.o_proj(y.view(B, H, T, N).transpose(1, 2).reshape(B, T, H * N))
