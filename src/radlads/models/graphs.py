"""CUDA-graph decoding: one captured one-token forward per batch size.

A student's cache has the same shape at every position, so the decode step is a fixed sequence of
small kernels. Eager PyTorch spends far longer launching them than the GPU spends running them;
replaying a captured graph launches them all at once. What is captured is the step compiled by
torch.compile (`compile_decode`, on by default): at one token every kernel is tiny, so the step
costs about a fixed time per kernel, and Inductor fuses the ~50 kernels of an eager layer (norms,
RoPE, LoRA activations, decay, the state update) into a handful.

A hybrid's softmax layers grow a KV cache every token, which a graph cannot: their keys and values
live in buffers of fixed capacity (`StaticKV`), the step writes at a position it reads from the
device and attends over the whole buffer through a mask. A buffer holds the next power of two of
positions (at least 256), so a growing sequence recaptures a handful of times and computes
over at most twice the positions it has. A hybrid whose softmax layers attend over a sliding
window (`softmax_window`) needs no more than its window and sinks: its buffers (`WindowKV`) have
that many slots from the first step, and each step overwrites the key no later token sees.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .attention import KVBuffers, StaticKV, WindowKV
from .cache import RadladsCache

logger = logging.getLogger(__name__)


def _uncached_autocast():
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def one_token(
    model: nn.Module, ids: Tensor, positions: Tensor, keep: Tensor, states: list[Tensor | KVBuffers]
) -> Tensor:
    """Logits of one decoding step from the recurrent `states` (and a hybrid's KV buffers),
    which it updates in place."""
    scratch = RadladsCache(len(states))
    scratch.states = list(states)
    hidden = model.model(
        input_ids=ids, position_ids=positions, attention_mask=keep, cache=scratch
    ).last_hidden_state
    for static, new in zip(states, scratch.states):
        if isinstance(static, Tensor):  # KV buffers are written where they are
            static.copy_(new)
    return model.lm_head(hidden)


def kv_capacity(length: int) -> int:
    """Positions of the StaticKV buffers that hold `length` of them (module docstring)."""
    return max(256, 1 << (length - 1).bit_length())


def kv_length(states: list) -> int:
    """Positions a cache's softmax layers hold (0 for a student without them)."""
    return next((s[0].shape[1] for s in states if isinstance(s, tuple)), 0)


def buffer_capacity(config, states: list) -> int:
    """Positions of the KV buffers a cache's next step decodes in (0: no softmax layers)."""
    if not kv_length(states):
        return 0
    return config.softmax_kv_slots or kv_capacity(kv_length(states) + 1)


def _buffers(state, capacity: int, length: Tensor, valid: Tensor):
    """The fixed buffers that stand in for one layer's state while it decodes captured."""
    if not isinstance(state, tuple):
        return state.clone()
    if len(state) == 4:  # a windowed layer's (keys, values, columns, ranks)
        return WindowKV.like(state, capacity)
    return StaticKV.like(state, capacity, length, valid)


@functools.cache
def compiled_one_token():
    # fullgraph: a graph break or Dynamo's recompile limit raises, and the caller captures the
    # uncompiled step instead of a silently split or uncompiled one. Default dynamism: the first
    # batch size compiles with static shapes, a second one recompiles with the batch dynamic, and
    # later batch sizes reuse that (compiling a 24-layer step takes tens of seconds). Inductor's
    # kernels are captured like any others; its own CUDA graphs ("reduce-overhead") would nest in ours.
    return torch.compile(one_token, fullgraph=True)


class LentState:
    """State buffers that one cache at a time decodes with in place: recurrent states, and a
    hybrid's KV buffers of `capacity` positions. A cache that binds them points its `states`
    at them (its keys and values at views of their filled part); the cache bound before gets back
    a copy of whatever of them it still points at. A cache that dropped or replaced its states
    since (a server's batch empties, or moves to another size) has nothing here to copy."""

    def __init__(self, states: list, capacity: int = 0):
        first = states[0][0] if isinstance(states[0], tuple) else states[0]
        self.length = torch.zeros((), dtype=torch.long, device=first.device)
        self.valid = torch.zeros(first.shape[0], capacity, dtype=torch.bool, device=first.device)
        self.valid[:, :1] = True  # no all-masked row while capturing
        self.states = [_buffers(s, capacity, self.length, self.valid) for s in states]
        self.windowed = any(isinstance(t, WindowKV) for t in self.states)
        self.bound: weakref.ref[RadladsCache] | None = None

    def holds(self, cache: RadladsCache) -> bool:
        return all(
            isinstance(s, tuple) and t.holds(s) if isinstance(t, KVBuffers) else s is t
            for s, t in zip(cache.states, self.states)
        )

    def begin(self, cache: RadladsCache, attention_mask: Tensor | None) -> int:
        """Before a step: bind `cache`, mark the positions each row attends to; its KV length."""
        length = kv_length(cache.states)
        self.bind(cache)
        if length and not self.windowed:
            self.prepare(length, attention_mask)
        return length

    def end(self, cache: RadladsCache, length: int) -> None:
        """After a step from `length` positions: lend `cache` what the buffers now hold."""
        if length:
            self.lend(cache, length + 1)
        cache.seen_tokens += 1

    def bind(self, cache: RadladsCache) -> None:
        if self.holds(cache):
            return
        previous = self.bound() if self.bound is not None else None
        if previous is not None and previous is not cache:
            previous.states = [_unlent(s, t) for s, t in zip(previous.states, self.states)]
        for static, state in zip(self.states, cache.states):
            if isinstance(static, KVBuffers):
                static.load(state)
            else:
                static.copy_(state)
        self.lend(cache, kv_length(cache.states))
        self.bound = weakref.ref(cache)

    def lend(self, cache: RadladsCache, length: int) -> None:
        """Point `cache` at these states, its keys and values at their first `length` positions."""
        cache.states = [
            t.filled(length) if isinstance(t, StaticKV) else t.filled() if isinstance(t, WindowKV) else t
            for t in self.states
        ]

    def prepare(self, length: int, attention_mask: Tensor | None) -> None:
        """Before a step that writes position `length`: which positions each row attends to."""
        self.length.fill_(length)
        self.valid[:, length + 1 :] = False
        if attention_mask is None:
            self.valid[:, : length + 1] = True
        else:
            self.valid[:, : length + 1] = attention_mask[:, -(length + 1) :].bool()
            self.valid[:, length] = True  # each query sees itself, as in eager attention


def _unlent(state, static):
    """A cache's state with a copy in place of any tensor that is (a view of) a lent one."""
    if isinstance(static, KVBuffers):
        return tuple(t.clone() for t in state) if isinstance(state, tuple) and static.holds(state) else state
    return state.clone() if state is static else state


class DecodeGraph:
    """The captured step for one batch size. It owns static input buffers and the recurrent state;
    the cache being decoded borrows that state (its `states` point at the graph's tensors), so a
    replay reads and updates the state in place with no copies."""

    def __init__(
        self,
        model: nn.Module,
        cache: RadladsCache,
        batch: int,
        mask_dtype: torch.dtype,
        compiled: bool,
        capacity: int = 0,
    ):
        self.state = LentState(cache.states, capacity)
        device = self.state.length.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.keep = torch.ones(batch, 1, dtype=mask_dtype, device=device)
        self.compiled = compiled
        self.graph = torch.cuda.CUDAGraph()
        self.logits = self._capture(model, compiled_one_token() if compiled else one_token)

    def _capture(self, model: nn.Module, step) -> Tensor:
        # Warm up on a side stream first (as torch.cuda.graphs asks): compiling, Triton autotuning
        # and lazy initialisation must not happen while capturing. The warm-up only touches our own
        # buffers. Under autocast, its cache of low-precision weight copies lives only as long as
        # the autocast block: a graph reading those copies would read freed memory on the next call.
        inputs = (model, self.ids, self.positions, self.keep, self.state.states)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with _uncached_autocast(), torch.cuda.stream(side):
            for _ in range(2):
                step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        with _uncached_autocast(), torch.cuda.graph(self.graph):
            return step(*inputs)

    def __call__(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache: RadladsCache
    ) -> Tensor:
        length = self.state.begin(cache, attention_mask)
        self.ids.copy_(input_ids)
        self.positions.copy_(position_ids)
        if attention_mask is None:
            self.keep.fill_(1)
        else:
            self.keep.copy_(attention_mask[:, -1:])
        self.graph.replay()
        self.state.end(cache, length)
        # The next replay overwrites the static logits; callers may keep these.
        return self.logits.clone()


class DecodeGraphs:
    """A model's captured decode steps, one per batch size (and KV capacity, mask dtype, autocast,
    inference mode), the `MAX_GRAPHS` most recently used ones kept, of which at most one with a
    whole-context hybrid's KV buffers (a windowed hybrid's, of one fixed size, are kept as a pure
    student's states are): each holds its batch's recurrent state and a memory pool. All are
    dropped when a parameter moved or changed dtype (`.to()`, reloading), since a graph reads the
    memory it was captured on. Kept beside the model (see `decode_graphs`),
    not on it: a graph is no state to save or copy."""

    MAX_GRAPHS = 4

    def __init__(self):
        self.graphs: OrderedDict[tuple, DecodeGraph] = OrderedDict()
        self.weights: tuple = ()
        self.failed = False
        self.uncompilable = False
        self.announced = False

    def clear(self) -> None:
        """Free every captured graph (a cache decoding through one keeps its state)."""
        self.graphs.clear()

    def applies(self, model: nn.Module, input_ids: Tensor | None, cache: RadladsCache | None) -> bool:
        config = model.config
        return (
            not self.failed
            and config.cuda_graph_decode
            and input_ids is not None
            and input_ids.is_cuda
            and input_ids.shape[1] == 1
            and not torch.is_grad_enabled()
            and cache is not None
            and all(_batched(s, input_ids.shape[0]) for s in cache.states)
            and not torch.compiler.is_compiling()
        )

    def __call__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        cache: RadladsCache,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
    ) -> Tensor | None:
        """Logits of one decoding step, or None where it must run eagerly (a model spread over
        several devices, or capturing failed)."""
        params = list(model.parameters())
        if any(p.device != input_ids.device for p in params):
            return None
        weights = tuple((p.data_ptr(), p.dtype) for p in params)
        if weights != self.weights:
            self.graphs.clear()
            self.weights, self.failed, self.uncompilable = weights, False, False
        batch = input_ids.shape[0]
        if position_ids is None:
            position_ids = torch.full((batch, 1), cache.seen_tokens, device=input_ids.device)
        mask_dtype = attention_mask.dtype if attention_mask is not None else input_ids.dtype
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        compiled = model.config.compile_decode and not self.uncompilable
        capacity = buffer_capacity(model.config, cache.states)
        key = (batch, capacity, mask_dtype, autocast, torch.is_inference_mode_enabled(), compiled)
        # Capture and replay on the model's GPU: a graph captures the current device's work only.
        with torch.cuda.device(input_ids.device):
            if key not in self.graphs:
                # One graph with growing KV buffers at a time, the old one freed before the new one
                # takes memory: they are as large as the batch's KV cache, and a batch that grew or
                # changed size does not go back. A windowed hybrid's buffers never grow: a stack
                # of sequences moves between batch sizes and back, as a pure student's does.
                growing = capacity and not model.config.softmax_kv_slots
                for old in [k for k in self.graphs if growing and k[1]]:
                    del self.graphs[old]
                graph = self._capture(model, cache, batch, mask_dtype, compiled, capacity)
                if graph is None:
                    return None
                key = (*key[:-1], graph.compiled)  # uncompiled where compiling failed
                self.graphs[key] = graph
                while len(self.graphs) > self.MAX_GRAPHS:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            return self.graphs[key](input_ids, position_ids[:, -1:], attention_mask, cache)

    def _capture(
        self, model: nn.Module, cache: RadladsCache, batch: int, mask_dtype, compiled: bool, capacity: int
    ) -> DecodeGraph | None:
        """The compiled step captured, else (compiling failed) the uncompiled step, else None."""
        if compiled and not self.announced:  # the first decoding step stalls; say why, once
            logger.warning(
                "compiling the decoding step (~1 min for the first batch size, once more for a second "
                "one; config.compile_decode = False skips it)"
            )
            self.announced = True
        for attempt in (True, False) if compiled else (False,):
            try:
                return DecodeGraph(model, cache, batch, mask_dtype, attempt, capacity)
            except Exception as error:  # e.g. a RoPE variant that syncs with the host per step
                what = "compiled CUDA-graph decoding" if attempt else "CUDA-graph decoding"
                logger.warning("%s is off for this model (%s)", what, error)
                self.uncompilable |= attempt
        self.failed = True
        return None


def _batched(state, batch: int) -> bool:
    """A recurrent state, or a softmax layer's keys and values, of `batch` rows."""
    tensors = state if isinstance(state, tuple) else (state,)
    return all(isinstance(t, Tensor) and t.shape[0] == batch for t in tensors)


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: nn.Module) -> DecodeGraphs:
    """The decode graphs of `model`; they go when the model goes."""
    if model not in _GRAPHS:
        _GRAPHS[model] = DecodeGraphs()
    return _GRAPHS[model]
