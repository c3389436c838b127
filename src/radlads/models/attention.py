"""Softmax attention kept from the teacher in hybrid students (`softmax_layers`), over the whole
context or, with `softmax_window`, over a sliding window plus the first tokens (attention sinks),
which bounds a hybrid's decoding memory as a pure student's is bounded."""

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


def window_mask(key_cols: Tensor, key_ranks: Tensor, query_cols: Tensor, window: int, sinks: int) -> Tensor:
    """Boolean [B|1, 1, T, S] mask of a windowed layer. Keys and queries carry their column in the
    token stream; a key's rank counts the real tokens of its row up to it (0: padding or an empty
    slot). A query sees the real keys at most `window` - 1 columns before it and the first `sinks`
    real tokens of its row, which StreamingLLM found the trained attention leans on; and itself,
    so that no row is all-masked."""
    q, k, rank = query_cols[:, :, None], key_cols[:, None, :], key_ranks[:, None, :]
    seen = (rank > 0) & (k <= q) & ((q - k < window) | (rank <= sinks))
    return (seen | (k == q))[:, None]


def new_columns(
    q: Tensor, attention_mask: Tensor | None, old_cols: Tensor | None = None, old_ranks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Columns and ranks ([B|1, T]) of the T new tokens of `q` ([B, T, ...]), after kept keys of
    these columns and ranks (None: the first tokens); padding (0 in the mask's last T columns)
    gets rank 0."""
    T = q.shape[1]
    real = q.new_ones(1, T, dtype=torch.bool) if attention_mask is None else attention_mask[:, -T:].bool()
    cols = torch.arange(T, device=q.device)[None]
    ranks = real.cumsum(-1) * real
    if old_cols is not None:
        cols = cols + old_cols.amax(-1, keepdim=True) + 1
        ranks = ranks + old_ranks.amax(-1, keepdim=True) * real
    return cols, ranks


@dataclass
class KVBuffers:
    """A softmax layer's keys and values in head-major buffers, [B, H_kv, C, N], of a fixed
    capacity C, for the captured decoding step (radlads.models.graphs), whose tensors may not
    change shape; between steps a cache holds [B, T, H_kv, N] views of them."""

    keys: Tensor
    values: Tensor

    def holds(self, state: tuple[Tensor, ...]) -> bool:
        """Whether `state` is such a view of these buffers (so they already hold it)."""
        return state[0].data_ptr() == self.keys.data_ptr() and state[1].data_ptr() == self.values.data_ptr()


def empty_buffers(state: tuple[Tensor, ...], capacity: int) -> tuple[Tensor, Tensor]:
    """Zeroed head-major buffers of `capacity` positions for a cache's keys and values, each in its
    own dtype (under autocast, RoPE leaves fp32 keys beside bf16 values)."""
    B, _, H, N = state[0].shape
    return tuple(t.new_zeros(B, H, capacity, N) for t in state[:2])


def pad_slots(t: Tensor, slots: int, fill: int) -> Tensor:
    """`t` ([B, S, ...]) with `fill` appended along dim 1 up to `slots` positions."""
    return torch.cat([t, t.new_full((t.shape[0], slots - t.shape[1], *t.shape[2:]), fill)], 1)


@dataclass
class StaticKV(KVBuffers):
    """A whole-context layer's buffers. A step writes its token's key and value at position
    `length` (a device scalar, so one graph serves every length up to the capacity C) and attends
    to the positions `valid` ([B, C], shared by the model's softmax layers) marks: each row's own
    tokens, never padding or slots not yet written. Head-major, attention reads each KV head once,
    as one batched matmul for all the query heads that share it."""

    length: Tensor
    valid: Tensor

    @classmethod
    def like(cls, state: tuple[Tensor, Tensor], capacity: int, length: Tensor, valid: Tensor) -> StaticKV:
        """Empty buffers for a cache's keys and values ([B, T, H_kv, N] each)."""
        return cls(*empty_buffers(state, capacity), length, valid)

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


@dataclass
class WindowKV(KVBuffers):
    """A windowed layer's buffers (of the state `attend_window` keeps), of `sinks` + `window`
    slots. A step evicts, per row and on the device, the key no later token can see: an empty slot
    first, else the oldest key that is no sink. So one graph serves every length, and the cache
    between steps holds views of all the slots."""

    cols: Tensor  # [B, C]: -1 in empty slots, so that the newest column is the maximum
    ranks: Tensor  # [B, C]: 0 in empty slots

    @classmethod
    def like(cls, state: tuple[Tensor, ...], capacity: int) -> WindowKV:
        cols = torch.full((state[0].shape[0], capacity), -1, dtype=torch.long, device=state[0].device)
        return cls(*empty_buffers(state, capacity), cols, torch.zeros_like(cols))

    def load(self, state: tuple[Tensor, ...]) -> None:
        """Copy a cache's state (as many slots as these buffers: `still_seen`) in."""
        keys, values, cols, ranks = state
        if keys.shape[1] != self.keys.shape[2]:
            raise ValueError(
                f"a windowed state of {keys.shape[1]} slots, for buffers of {self.keys.shape[2]}: "
                "the window changed since this cache was made; start a new one"
            )
        self.keys.copy_(keys.transpose(1, 2))
        self.values.copy_(values.transpose(1, 2))
        self.cols.copy_(cols)
        self.ranks.copy_(ranks)

    def write(self, k: Tensor, v: Tensor, col: Tensor, rank: Tensor, sinks: int) -> None:
        """Put one token's key ([B, 1, H_kv, N]), value, column and rank ([B, 1]) in each row's
        least needed slot."""
        sink = (self.ranks > 0) & (self.ranks <= sinks)
        age = torch.where(self.ranks == 0, -1, torch.where(sink, torch.iinfo(torch.long).max, self.cols))
        slot = age.argmin(-1, keepdim=True)
        B, H, _, N = self.keys.shape
        at = slot[:, None, :, None].expand(B, H, 1, N)
        self.keys.scatter_(2, at, k.transpose(1, 2))
        self.values.scatter_(2, at, v.transpose(1, 2))
        self.cols.scatter_(1, slot, col)
        self.ranks.scatter_(1, slot, rank)

    def filled(self) -> tuple[Tensor, ...]:
        """Every slot, as a cache holds a windowed layer's state."""
        return self.keys.transpose(1, 2), self.values.transpose(1, 2), self.cols, self.ranks


class SoftmaxAttention(TeacherProjections):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        # Read at each call, as the decoding graphs and the server read it: a window set on a
        # loaded model's config applies everywhere at once.
        self.config = config

    @property
    def window(self) -> int | None:
        return self.config.softmax_window

    @property
    def sinks(self) -> int:
        return self.config.softmax_sinks

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: tuple[Tensor, ...] | KVBuffers | None = None,
        v_first: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...] | KVBuffers | None]:
        """y, v_first passed through, and where `use_cache` the keys and values so far (`state`, the
        earlier ones, [B, S, H_kv, N] each, with x's appended; a windowed layer's as `attend_window`
        keeps them)."""
        T = x.shape[1]
        q, k, v = self.project(x, position_embeddings)
        if isinstance(state, StaticKV):
            return self.attend_static(q, k, v, state), v_first, state
        if isinstance(state, WindowKV):
            return self.attend_window_static(q, k, v, state, attention_mask), v_first, state
        if self.window is not None:
            y, state = self.attend_window(q, k, v, state, attention_mask, use_cache)
            return y, v_first, state
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
        return self.output(y), v_first, state

    def output(self, y: Tensor) -> Tensor:
        """o_proj of SDPA's [B, H, T, N] output."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend_window(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: tuple | None,
        attention_mask: Tensor | None,
        use_cache: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        """Windowed attention (`window_mask`) over the kept keys and the new ones, and where
        `use_cache` the keys the next tokens may still see (`still_seen`): (keys, values, columns,
        ranks)."""
        if state is None:
            cols, ranks = new_columns(q, attention_mask)
            key_cols, key_ranks = cols, ranks
        else:
            old_k, old_v, old_cols, old_ranks = state
            cols, ranks = new_columns(q, attention_mask, old_cols, old_ranks)
            k, v = torch.cat([old_k, k], 1), torch.cat([old_v, v], 1)
            key_cols, key_ranks = torch.cat([old_cols, cols], 1), torch.cat([old_ranks, ranks], 1)
        # Where the window covers every key (no earlier keys, no padding, no more tokens than the
        # window), SDPA's causal kernels rather than a [T, S] mask: training at up to the window's
        # length then costs what a whole-context layer costs.
        if state is None and attention_mask is None and q.shape[1] <= self.window:
            mask, causal = None, True
        else:
            mask, causal = window_mask(key_cols, key_ranks, cols, self.window, self.sinks), False
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            self.expand_kv(k).transpose(1, 2),
            self.expand_kv(v).transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
        )
        return self.output(y), self.still_seen(k, v, key_cols, key_ranks) if use_cache else None

    def still_seen(self, k: Tensor, v: Tensor, cols: Tensor, ranks: Tensor) -> tuple[Tensor, ...]:
        """The keys (and their values, columns, ranks) that a later token may see: the sinks, the
        last `window` - 1 columns and the newest column (whose place the next one counts from), in
        their order, in exactly `sinks` + `window` slots per row whatever the context's length, the
        spare ones empty (as WindowKV empties them). So a windowed cache has one shape from its
        first token on, and the states of several sequences stack as a pure student's do."""
        B = k.shape[0]
        cols, ranks = cols.expand(B, -1), ranks.expand(B, -1)
        capacity = self.config.softmax_kv_slots
        if k.shape[1] < capacity:
            k, v, cols, ranks = (
                pad_slots(t, capacity, fill) for t, fill in ((k, 0), (v, 0), (cols, -1), (ranks, 0))
            )
        newest = cols.amax(-1, keepdim=True)
        keep = ((ranks > 0) & ((ranks <= self.sinks) | (newest - cols < self.window - 1))) | (cols == newest)
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :capacity]
        kept = keep.gather(1, order)
        pick, empty = order[:, :, None, None].expand(-1, -1, *k.shape[2:]), ~kept[:, :, None, None]
        k, v = k.gather(1, pick).masked_fill(empty, 0), v.gather(1, pick).masked_fill(empty, 0)
        return k, v, cols.gather(1, order).masked_fill(~kept, -1), ranks.gather(1, order) * kept

    def attend_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticKV) -> Tensor:
        """One decoding step on fixed-capacity buffers, attending over all C positions through the
        mask."""
        state.append(k, v)
        return self.attend_buffers(q, state.keys, state.values, state.valid[:, None, None, :])

    def attend_window_static(
        self, q: Tensor, k: Tensor, v: Tensor, state: WindowKV, attention_mask: Tensor | None
    ) -> Tensor:
        """One decoding step of a windowed layer on its WindowKV buffers."""
        col, rank = new_columns(q, attention_mask, state.cols, state.ranks)
        state.write(k, v, col, rank, self.sinks)
        seen = window_mask(state.cols, state.ranks, col, self.window, self.sinks)
        return self.attend_buffers(q, state.keys, state.values, seen)

    def attend_buffers(self, q: Tensor, keys: Tensor, values: Tensor, seen: Tensor) -> Tensor:
        """Attention of q ([B, T, H, N]) over head-major buffers ([B, H_kv, C, N]) where `seen`
        ([B, 1, 1, C]) allows. Query head h reads KV head h // G (as HF's repeat_kv), here without
        repeating them."""
        B, T, H, N = q.shape
        q = q.transpose(1, 2).reshape(B, self.num_kv_heads, H // self.num_kv_heads * T, N)
        scores = (q @ keys.transpose(-1, -2)).float() * N**-0.5
        scores = scores.masked_fill(~seen, float("-inf"))
        y = scores.softmax(-1).to(values.dtype) @ values
        return self.o_proj(y.view(B, H, T, N).transpose(1, 2).reshape(B, T, H * N))
