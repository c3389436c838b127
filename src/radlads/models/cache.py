"""The students' generation cache: per layer a fixed-size recurrent state (or a KV cache for
hybrid softmax layers), so memory per sequence does not grow with context."""

from __future__ import annotations

import torch
from torch import Tensor


class RadladsCache:
    """Per-layer state: an fp32 [B, H, K, V] tensor for linear-attention layers, a (keys, values)
    pair of [B, T, H_kv, N] tensors for softmax layers, and for windowed ones (keys, values,
    columns, ranks), the last two [B, T] (models.attention). `seen_tokens` counts consumed
    positions."""

    # generate() asks before it compiles a forward; ours compile their own pieces (prefill, graphs).
    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list[Tensor | tuple[Tensor, ...] | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow beam search's reordering of the batch."""
        for i, s in enumerate(self.states):
            if isinstance(s, tuple):
                self.states[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)
            elif s is not None:
                self.states[i] = s.index_select(0, beam_idx.to(s.device))

    def nbytes(self) -> int:
        tensors = [t for s in self.states if s is not None for t in (s if isinstance(s, tuple) else (s,))]
        return sum(t.numel() * t.element_size() for t in tensors)
