"""The running decode batch: the sequences past their prefill, one new token each per step.

A pure linear-attention student's state has one shape at every position, so the states of all
running sequences stack along the batch dimension (`StackedStates`): a step is one forward for the
whole batch, through the model's CUDA-graph step on CUDA. Models with a KV cache (teachers,
hybrid students) hold caches of different lengths, which do not stack: each sequence decodes with
its own cache, one forward per sequence and step (`SeparateCaches`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..models.cache import RadladsCache
from ..models.graphs import decode_graphs


class Running(Protocol):
    """What a batch needs of a sequence."""

    cache: object  # its own cache while it has one (after prefill, before joining a stack)
    position: int  # position of the token it feeds next
    last_token: int


def is_student(model) -> bool:
    return getattr(model.config, "model_type", None) == "radlads"


def forward(model, ids: Tensor, cache) -> tuple[Tensor, object]:
    """The last position's logits ([B, V]) of `ids` run on from `cache` (a student's RadladsCache, a
    teacher's DynamicCache, None to start one), and the cache after them."""
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


def cache_bytes(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, RadladsCache):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def stackable(model) -> bool:
    """A student whose every layer is linear attention: a fixed-size state per sequence."""
    return is_student(model) and not model.config.softmax_layers


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes the stacked states take (1, 4, 16, ... and max_batch): few sizes, so few CUDA
    graphs, each at most 4x the sequences it carries."""
    sizes = [1]
    while sizes[-1] * 4 < max_batch:
        sizes.append(sizes[-1] * 4)
    return sorted({*sizes, max_batch})


class StackedStates:
    """States of the running sequences in the rows ("slots") of one RadladsCache. A sequence joins
    into a free slot and leaves it free: the batch only changes size (and copies its states) when
    it moves to another bucket."""

    def __init__(self, model, max_batch: int):
        self.model = model
        self.buckets = bucket_sizes(max_batch)
        self.cache = RadladsCache(model.config.num_hidden_layers)
        self.slots: list[Running | None] = []
        decode_graphs(model).MAX_GRAPHS = len(self.buckets)

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    def sequences(self) -> list[Running]:
        return [s for s in self.slots if s is not None]

    def join(self, seq: Running) -> None:
        if None not in self.slots:
            self._resize(next(b for b in self.buckets if b > len(self.slots)), seq.cache.states)
        slot = self.slots.index(None)
        for row, state in zip(self.cache.states, seq.cache.states):
            row[slot].copy_(state[0])
        self.slots[slot], seq.cache = seq, None

    def leave(self, seq: Running) -> None:
        self.slots[self.slots.index(seq)] = None
        count = len(self)
        smaller = [b for b in self.buckets if b < len(self.slots) and b >= count]
        if count == 0:
            self.slots, self.cache.states = [], [None] * len(self.cache.states)
        elif smaller:
            self._resize(smaller[0], self.cache.states)

    def _resize(self, capacity: int, like: list[Tensor]) -> None:
        """Move the running sequences' states into a batch of `capacity` rows (zeros elsewhere)."""
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        states = []
        for old, template in zip(self.cache.states, like):
            new = template.new_zeros(capacity, *template.shape[1:])
            if rows:
                new[: len(rows)] = old[rows]
            states.append(new)
        self.cache.states = states
        self.slots = [self.slots[i] for i in rows] + [None] * (capacity - len(rows))

    def step(self) -> tuple[list[Running], Tensor]:
        """One token for every running sequence: the sequences and their logits, [B, V]."""
        device = self.cache.states[0].device
        ids = torch.zeros(len(self.slots), 1, dtype=torch.long)
        positions = torch.zeros(len(self.slots), 1, dtype=torch.long)
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        for i in rows:
            ids[i, 0], positions[i, 0] = self.slots[i].last_token, self.slots[i].position
        out = self.model(
            input_ids=ids.to(device), position_ids=positions.to(device), cache=self.cache, use_cache=True
        )
        return [self.slots[i] for i in rows], out.logits[rows, -1]

    def nbytes(self) -> int:
        return cache_bytes(self.cache)


class SeparateCaches:
    """Each running sequence keeps its own cache and decodes alone."""

    def __init__(self, model):
        self.model = model
        self.running: list[Running] = []

    def __len__(self) -> int:
        return len(self.running)

    def sequences(self) -> list[Running]:
        return list(self.running)

    def join(self, seq: Running) -> None:
        self.running.append(seq)

    def leave(self, seq: Running) -> None:
        self.running.remove(seq)

    def step(self) -> tuple[list[Running], Tensor]:
        rows = []
        device = self.model.get_input_embeddings().weight.device
        for seq in self.running:
            logits, seq.cache = forward(
                self.model, torch.tensor([[seq.last_token]], device=device), seq.cache
            )
            rows.append(logits)
        return list(self.running), torch.cat(rows)

    def nbytes(self) -> int:
        return sum(cache_bytes(s.cache) for s in list(self.running))
