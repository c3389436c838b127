"""The running decode batch: the sequences past their prefill, one new token each per step.

A pure linear-attention student's state has one shape at every position, and so has that of a
hybrid whose softmax layers attend over a window (`softmax_window`: its keys fill a fixed number
of slots), so the states of all running sequences stack along the batch dimension
(`StackedStates`): a step is one forward for the whole batch, through the model's CUDA-graph step
on CUDA. The KV caches of a plain HF model, and of a hybrid student's softmax layers, differ in
length: they are left-padded to one length and
stacked, and a padding mask keeps each sequence from attending to another's padding
(`PaddedCaches`), as batched `generate()` does; a step is again one forward for the whole batch:
eager for a teacher, through the captured step on CUDA for a hybrid student. Models whose cache
this does not fit (a sliding-window attention) decode each sequence with its own cache, one
forward per sequence and step (`SeparateCaches`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..models.cache import RadladsCache
from ..models.graphs import decode_graphs, kv_capacity


class Running:
    """A sequence's tokens as a batch reads them, and its own cache while it has one (after its
    prefill, before it joins a batch)."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.generated: list[int] = []
        self.cache = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    @property
    def position(self) -> int:
        """Position of the token it feeds next: the number of tokens its cache holds."""
        return len(self.prompt) + len(self.generated) - 1


def is_student(model) -> bool:
    return getattr(model.config, "model_type", None) == "radlads"


@functools.cache
def _cache_argument(model_class: type) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x): the name this class's forward takes."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def call(model, cache, **inputs) -> tuple[Tensor, object]:
    """`model(**inputs)` run on from `cache`: its logits and the cache after them."""
    name = _cache_argument(type(model))
    out = model(**inputs, **{name: cache}, use_cache=True, logits_to_keep=1)
    return out.logits, out[name]


def forward(model, ids: Tensor, cache) -> tuple[Tensor, object]:
    """The last position's logits ([B, V]) of `ids` run on from `cache` (a student's RadladsCache, a
    teacher's DynamicCache, None to start one), and the cache after them."""
    logits, cache = call(model, cache, input_ids=ids)
    return logits[:, -1], cache


def cache_bytes(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, RadladsCache):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def stackable(model) -> bool:
    """A student whose every layer holds a fixed-size state per sequence: linear attention, or
    softmax attention over a window (its keys in a fixed number of slots)."""
    return is_student(model) and (not model.config.softmax_layers or bool(model.config.softmax_window))


def paddable(model) -> bool:
    """A hybrid student (unless windowed: stackable), or a plain HF model whose every layer keeps its
    whole KV cache (no sliding window): left padding and a mask batch their sequences exactly."""
    if is_student(model):
        return not model.config.softmax_window
    # Ask transformers which cache layers the model gets: its rules for sliding windows differ by
    # family (Mistral's `sliding_window` alone, Qwen2's per-layer `layer_types`, ...).
    try:
        layers = DynamicCache(config=model.config).layers
    except (TypeError, ValueError):  # a config this transformers cannot build a cache from
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


@dataclass(frozen=True)
class SequenceCost:
    """Bytes a sequence's cache holds: `fixed` (recurrent states) plus `per_token` (keys and
    values) for each token it has seen. Measured, not computed from the config: a forward of one
    token and one of two, whatever the model's layers."""

    fixed: int
    per_token: int

    @classmethod
    @torch.no_grad()
    def measure(cls, model) -> SequenceCost:
        device = model.get_input_embeddings().weight.device
        one, two = (
            cache_bytes(forward(model, torch.zeros(1, n, dtype=torch.long, device=device), None)[1])
            for n in (1, 2)
        )
        return cls(fixed=2 * one - two, per_token=two - one)


def decode_batch(model, max_batch: int):
    """The running batch that suits `model` (module docstring)."""
    if stackable(model):
        return StackedStates(model, max_batch)
    return PaddedCaches(model) if paddable(model) else SeparateCaches(model)


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
            for rows, one in _each(row, state):
                rows[slot].copy_(one[0])
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
        for i, template in enumerate(like):  # one layer at a time: the old layer goes as the new comes
            new = [t.new_zeros(capacity, *t.shape[1:]) for _, t in _each(template, template)]
            if rows:
                for fresh, (old, _) in zip(new, _each(self.cache.states[i], template)):
                    fresh[: len(rows)] = old[rows]
            self.cache.states[i] = tuple(new) if isinstance(template, tuple) else new[0]
        self.slots = [self.slots[i] for i in rows] + [None] * (capacity - len(rows))

    def warm_up(self, prefilled: RadladsCache) -> None:
        """One throwaway step at each batch size the stack takes, states shaped as a prefilled
        sequence's: the decoding step compiles and captures its graph for each now."""
        for size in self.buckets:
            cache = _zeros_like(prefilled, size)
            ids = torch.zeros(size, 1, dtype=torch.long, device=_tensors(prefilled)[0][0].device)
            self.model(input_ids=ids, position_ids=ids + 1, cache=cache, use_cache=True)

    def step(self) -> tuple[list[Running], Tensor]:
        """One token for every running sequence: the sequences and their logits, [B, V]."""
        device = _tensors(self.cache)[0][0].device
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

    def projected_bytes(self, lengths: list[int], cost: SequenceCost) -> int:
        """The states of sequences that will reach these lengths, in the bucket that holds them."""
        rows = next((b for b in self.buckets if b >= len(lengths)), len(lengths))
        return rows * cost.fixed


class SeparateCaches:
    """Each running sequence keeps its own cache and decodes alone."""

    def __init__(self, model):
        self.model = model
        self.running: list[Running] = []

    def __len__(self) -> int:
        return len(self.running)

    def sequences(self) -> list[Running]:
        return list(self.running)

    def warm_up(self, prefilled) -> None:
        """Nothing: each sequence decodes eagerly, with nothing compiled per batch size."""

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

    def projected_bytes(self, lengths: list[int], cost: SequenceCost) -> int:
        """The caches of sequences that will reach these lengths, each its own size."""
        return len(lengths) * cost.fixed + sum(lengths) * cost.per_token


def _each(state, like) -> list[tuple[Tensor, Tensor]]:
    """A layer's state and `like` (another of that layer's) tensor by tensor: one recurrent state,
    or a softmax layer's keys, values (and a windowed one's columns and ranks)."""
    return list(zip(state, like)) if isinstance(like, tuple) else [(state, like)]


def _zeros_like(prefilled: RadladsCache, rows: int, kv_length: int | None = None) -> RadladsCache:
    """A throwaway cache of `rows` sequences shaped as a prefilled one's, all zeros, its softmax
    layers' keys and values (a hybrid's) `kv_length` positions long (None: as long as there): for
    warm-up steps."""
    cache = RadladsCache(len(prefilled.states))
    cache.states = [
        tuple(t.new_zeros(rows, t.shape[1] if kv_length is None else kv_length, *t.shape[2:]) for t in s)
        if isinstance(s, tuple)
        else s.new_zeros(rows, *s.shape[1:])
        for s in prefilled.states
    ]
    return cache


def _left_pad(x: Tensor, width: int, dim: int) -> Tensor:
    """`x` with `width` zeros put before it along `dim`."""
    if width == 0:
        return x
    pad = x.new_zeros(*x.shape[:dim], width, *x.shape[dim + 1 :])
    return torch.cat([pad, x], dim)


def _tensors(cache) -> list[tuple[Tensor, int | None]]:
    """Every tensor of a cache with its time dimension: a teacher's keys and values ([B, H, T, N]),
    a hybrid student's softmax keys and values ([B, T, H, N]) and its recurrent states (None)."""
    if isinstance(cache, RadladsCache):
        return [
            (t, 1) if isinstance(s, tuple) else (t, None)
            for s in cache.states
            for t in (s if isinstance(s, tuple) else (s,))
        ]
    return [(t, 2) for layer in cache.layers for t in (layer.keys, layer.values)]


def _replace_each(cache, fn) -> None:
    """Replace each tensor t of `cache` (in `_tensors`' order) by fn(t, time_dim), one at a time,
    so that at most one tensor's old and new copies exist together. For PaddedCaches: a softmax
    layer's state is a whole-context (keys, values) pair there, never a windowed one (stackable)."""
    if isinstance(cache, RadladsCache):
        for i, s in enumerate(cache.states):
            if isinstance(s, tuple):
                cache.states[i] = (fn(s[0], 1), s[1])
                cache.states[i] = (cache.states[i][0], fn(s[1], 1))
            else:
                cache.states[i] = fn(s, None)
        return
    for layer in cache.layers:
        layer.keys = fn(layer.keys, 2)
        layer.values = fn(layer.values, 2)


class PaddedCaches:
    """The running sequences' caches stacked into one: keys and values left-padded to the longest
    sequence's length, with `valid` [B, T] marking the positions that hold a token (a hybrid
    student's recurrent states stack as they are). A join rebuilds the tensors one at a time, so
    the copy costs at most one tensor's memory beside the batch's. Sequences that leave free their
    rows at the next step or join, all of a step's leavers in one copy.

    Every row is as long as the longest: one long prompt among short ones costs as much memory as
    if all were long."""

    def __init__(self, model):
        self.model = model
        self.rows: list[Running | None] = []  # None: left, its row not yet dropped
        self.cache = None
        self.valid: Tensor | None = None

    def __len__(self) -> int:
        return len(self.sequences())

    def sequences(self) -> list[Running]:
        return [s for s in self.rows if s is not None]

    def warm_up(self, prefilled) -> None:
        """A hybrid student's decoding step compiles once for one batch size and KV capacity, again
        for a second of each (radlads.models.graphs), and then serves every size: throwaway steps
        at 1 and 2 rows, then past the first capacity. A teacher decodes eagerly: nothing to do."""
        if not is_student(self.model):
            return
        device = _tensors(prefilled)[0][0].device
        for rows, length in ((1, 1), (2, 1), (2, kv_capacity(1))):
            ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
            mask = torch.ones(rows, length + 1, dtype=torch.long, device=device)
            cache = _zeros_like(prefilled, rows, length)
            call(self.model, cache, input_ids=ids, attention_mask=mask, position_ids=ids + length)

    def join(self, seq: Running) -> None:
        self._drop_left()
        new, length = seq.cache, seq.position  # position: the tokens its cache holds
        ones = torch.ones(1, length, dtype=torch.bool, device=_tensors(new)[0][0].device)
        if self.cache is None:
            self.cache, self.valid = new, ones
        else:
            self._stack(new, length, ones)
        self.rows.append(seq)
        seq.cache = None

    def _stack(self, new, length: int, ones: Tensor) -> None:
        rows, width = self.valid.shape
        grow, pad = max(width, length) - width, max(width, length) - length
        theirs = iter(t for t, _ in _tensors(new))

        def stack(t: Tensor, dim: int | None) -> Tensor:
            other = next(theirs)
            if dim is None:
                return torch.cat([t, other])
            return torch.cat([_left_pad(t, grow, dim), _left_pad(other, pad, dim)])

        def undo(t: Tensor, dim: int | None) -> Tensor:  # views of what was there: no new memory
            if t.shape[0] == rows:
                return t
            return t[:rows] if dim is None else t[:rows].narrow(dim, grow, t.shape[dim] - grow)

        try:
            _replace_each(self.cache, stack)
        except Exception:  # out of memory, say: the running sequences keep their cache as it was
            _replace_each(self.cache, undo)
            raise
        self.valid = torch.cat([_left_pad(self.valid, grow, 1), _left_pad(ones, pad, 1)])

    def leave(self, seq: Running) -> None:
        self.rows[self.rows.index(seq)] = None
        if not any(self.rows):  # the last one: free the cache now, not at the next join
            self.rows, self.cache, self.valid = [], None, None

    def _drop_left(self) -> None:
        """Drop the rows of sequences that left, and the columns that are padding in every row
        still running, in one copy."""
        if None not in self.rows:
            return
        keep_rows = [i for i, s in enumerate(self.rows) if s is not None]
        self.rows = [self.rows[i] for i in keep_rows]
        if not keep_rows:
            self.cache = self.valid = None
            return
        index = torch.tensor(keep_rows, device=self.valid.device)
        valid = self.valid[index]
        first = int(valid.any(0).nonzero()[0])
        self.valid = valid[:, first:]

        def keep(t: Tensor, dim: int | None) -> Tensor:
            t = t[index]
            return t if dim is None else t.narrow(dim, first, t.shape[dim] - first)

        _replace_each(self.cache, keep)

    def step(self) -> tuple[list[Running], Tensor]:
        self._drop_left()
        device = self.valid.device
        ids = torch.tensor([[s.last_token] for s in self.rows], device=device)
        positions = torch.tensor([[s.position] for s in self.rows], device=device)
        mask = torch.cat([self.valid, self.valid.new_ones(len(self.rows), 1)], 1)
        logits, self.cache = call(
            self.model, self.cache, input_ids=ids, attention_mask=mask.long(), position_ids=positions
        )
        self.valid = mask
        return list(self.rows), logits[:, -1]

    def nbytes(self) -> int:
        return cache_bytes(self.cache)

    def projected_bytes(self, lengths: list[int], cost: SequenceCost) -> int:
        """The stacked caches of sequences that will reach these lengths: every row as long as the
        longest, and for a hybrid student decoding through its captured step, as long as the
        buffers that hold its keys and values then (radlads.models.graphs.kv_capacity)."""
        longest = max(lengths, default=0)
        if longest and self.captured():
            longest = kv_capacity(longest)
        return len(lengths) * (cost.fixed + longest * cost.per_token)

    def captured(self) -> bool:
        """Whether steps run through the model's CUDA graphs: a hybrid student's on CUDA."""
        model = self.model
        return is_student(model) and model.config.cuda_graph_decode and model.device.type == "cuda"
