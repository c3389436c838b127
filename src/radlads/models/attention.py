"""Softmax attention kept from the teacher in hybrid students (`softmax_layers`)."""

from __future__ import annotations

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
