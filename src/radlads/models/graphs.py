"""CUDA-graph decoding: one captured one-token forward per batch size.

A student's cache has the same shape at every position, so the decode step is a fixed sequence of
a few hundred small kernels. Eager PyTorch spends far longer launching them than the GPU spends
running them; replaying a captured graph launches them all at once. Softmax (hybrid) layers grow a
KV cache every token and cannot be captured: such students decode eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .cache import RadladsCache

logger = logging.getLogger(__name__)


def _uncached_autocast():
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class DecodeGraph:
    """The captured step for one batch size. It owns static input buffers and the recurrent state;
    the cache being decoded borrows that state (its `states` point at the graph's tensors), so a
    replay reads and updates the state in place with no copies."""

    def __init__(self, model: nn.Module, cache: RadladsCache, batch: int, mask_dtype: torch.dtype):
        device = cache.states[0].device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.keep = torch.ones(batch, 1, dtype=mask_dtype, device=device)
        self.states = [s.clone() for s in cache.states]
        self.bound: weakref.ref[RadladsCache] | None = None
        self.graph = torch.cuda.CUDAGraph()
        self.logits = self._capture(model)

    def _step(self, model: nn.Module) -> Tensor:
        scratch = RadladsCache(len(self.states))
        scratch.states = list(self.states)
        hidden = model.model(
            input_ids=self.ids, position_ids=self.positions, attention_mask=self.keep, cache=scratch
        ).last_hidden_state
        for static, new in zip(self.states, scratch.states):
            static.copy_(new)
        return model.lm_head(hidden)

    def _capture(self, model: nn.Module) -> Tensor:
        # Warm up on a side stream first (as torch.cuda.graphs asks): Triton autotuning and lazy
        # initialisation must not happen while capturing. The warm-up only touches our own buffers.
        # Under autocast, its cache of low-precision weight copies lives only as long as the
        # autocast block: a graph reading those copies would read freed memory on the next call.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with _uncached_autocast(), torch.cuda.stream(side):
            for _ in range(2):
                self._step(model)
        torch.cuda.current_stream().wait_stream(side)
        with _uncached_autocast(), torch.cuda.graph(self.graph):
            return self._step(model)

    def bind(self, cache: RadladsCache) -> None:
        """Make `cache` decode through this graph; the cache bound before keeps a copy of its state."""
        if all(s is t for s, t in zip(cache.states, self.states)):
            return
        previous = self.bound() if self.bound is not None else None
        if previous is not None and previous is not cache:
            previous.states = [s.clone() for s in previous.states]
        for static, state in zip(self.states, cache.states):
            static.copy_(state)
        cache.states = list(self.states)
        self.bound = weakref.ref(cache)

    def __call__(self, input_ids: Tensor, position_ids: Tensor, keep: Tensor, cache: RadladsCache) -> Tensor:
        self.bind(cache)
        self.ids.copy_(input_ids)
        self.positions.copy_(position_ids)
        self.keep.copy_(keep)
        self.graph.replay()
        cache.seen_tokens += 1
        # The next replay overwrites the static logits; callers may keep these.
        return self.logits.clone()


class DecodeGraphs:
    """A model's captured decode steps, one per batch size (and mask dtype, autocast, inference
    mode), the `MAX_GRAPHS` most recently used ones kept: each holds its batch's recurrent state and
    a memory pool. All are dropped when a parameter moved or changed dtype (`.to()`, reloading),
    since a graph reads the memory it was captured on. Kept beside the model (see `decode_graphs`),
    not on it: a graph is no state to save or copy."""

    MAX_GRAPHS = 4

    def __init__(self):
        self.graphs: OrderedDict[tuple, DecodeGraph] = OrderedDict()
        self.weights: tuple = ()
        self.failed = False

    def clear(self) -> None:
        """Free every captured graph (a cache decoding through one keeps its state)."""
        self.graphs.clear()

    def applies(self, model: nn.Module, input_ids: Tensor | None, cache: RadladsCache | None) -> bool:
        config = model.config
        return (
            not self.failed
            and config.cuda_graph_decode
            and not config.softmax_layers
            and input_ids is not None
            and input_ids.is_cuda
            and input_ids.shape[1] == 1
            and not torch.is_grad_enabled()
            and cache is not None
            and all(isinstance(s, Tensor) and s.shape[0] == input_ids.shape[0] for s in cache.states)
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
            self.weights, self.failed = weights, False
        batch = input_ids.shape[0]
        if position_ids is None:
            position_ids = torch.full((batch, 1), cache.seen_tokens, device=input_ids.device)
        keep = attention_mask[:, -1:] if attention_mask is not None else torch.ones_like(input_ids)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (batch, keep.dtype, autocast, torch.is_inference_mode_enabled())
        # Capture and replay on the model's GPU: a graph captures the current device's work only.
        with torch.cuda.device(input_ids.device):
            if key not in self.graphs:
                try:
                    self.graphs[key] = DecodeGraph(model, cache, batch, keep.dtype)
                except Exception as error:  # e.g. a RoPE variant that syncs with the host per step
                    logger.warning("CUDA-graph decoding is off for this model (%s); decoding eagerly", error)
                    self.failed = True
                    return None
                while len(self.graphs) > self.MAX_GRAPHS:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            return self.graphs[key](input_ids, position_ids[:, -1:], keep, cache)


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: nn.Module) -> DecodeGraphs:
    """The decode graphs of `model`; they go when the model goes."""
    if model not in _GRAPHS:
        _GRAPHS[model] = DecodeGraphs()
    return _GRAPHS[model]
