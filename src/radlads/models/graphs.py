"""CUDA-graph decoding: one captured one-token forward per batch size.

A student's cache has the same shape at every position, so the decode step is a fixed sequence of
small kernels. Eager PyTorch spends far longer launching them than the GPU spends running them;
replaying a captured graph launches them all at once. What is captured is the step compiled by
torch.compile (`compile_decode`, on by default): at one token every kernel is tiny, so the step
costs about a fixed time per kernel, and Inductor fuses the ~50 kernels of an eager layer (norms,
RoPE, LoRA activations, decay, the state update) into a handful. Softmax (hybrid) layers grow a
KV cache every token and cannot be captured: such students decode eagerly.
"""

from __future__ import annotations

import contextlib
import functools
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


def one_token(model: nn.Module, ids: Tensor, positions: Tensor, keep: Tensor, states: list[Tensor]) -> Tensor:
    """Logits of one decoding step from the recurrent `states`, which it updates in place."""
    scratch = RadladsCache(len(states))
    scratch.states = list(states)
    hidden = model.model(
        input_ids=ids, position_ids=positions, attention_mask=keep, cache=scratch
    ).last_hidden_state
    for static, new in zip(states, scratch.states):
        static.copy_(new)
    return model.lm_head(hidden)


@functools.cache
def compiled_one_token():
    # fullgraph: a graph break or Dynamo's recompile limit raises, and the caller captures the
    # uncompiled step instead of a silently split or uncompiled one. Default dynamism: the first
    # batch size compiles with static shapes, a second one recompiles with the batch dynamic, and
    # later batch sizes reuse that (compiling a 24-layer step takes tens of seconds). Inductor's
    # kernels are captured like any others; its own CUDA graphs ("reduce-overhead") would nest in ours.
    return torch.compile(one_token, fullgraph=True)


class LentState:
    """Recurrent state tensors that one cache at a time decodes with in place: a cache that binds
    them points its `states` at these tensors, and the cache bound before gets back a copy of
    whatever of them it still points at. A cache that dropped or replaced its states since (a
    server's batch empties, or moves to another size) has nothing here to copy."""

    def __init__(self, states: list[Tensor]):
        self.states = [s.clone() for s in states]
        self.bound: weakref.ref[RadladsCache] | None = None

    def bind(self, cache: RadladsCache) -> None:
        if all(s is t for s, t in zip(cache.states, self.states)):
            return
        previous = self.bound() if self.bound is not None else None
        if previous is not None and previous is not cache:
            previous.states = [s.clone() if s is t else s for s, t in zip(previous.states, self.states)]
        for static, state in zip(self.states, cache.states):
            static.copy_(state)
        cache.states = list(self.states)
        self.bound = weakref.ref(cache)


class DecodeGraph:
    """The captured step for one batch size. It owns static input buffers and the recurrent state;
    the cache being decoded borrows that state (its `states` point at the graph's tensors), so a
    replay reads and updates the state in place with no copies."""

    def __init__(
        self, model: nn.Module, cache: RadladsCache, batch: int, mask_dtype: torch.dtype, compiled: bool
    ):
        device = cache.states[0].device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.keep = torch.ones(batch, 1, dtype=mask_dtype, device=device)
        self.state = LentState(cache.states)
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

    def __call__(self, input_ids: Tensor, position_ids: Tensor, keep: Tensor, cache: RadladsCache) -> Tensor:
        self.state.bind(cache)
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
            self.weights, self.failed, self.uncompilable = weights, False, False
        batch = input_ids.shape[0]
        if position_ids is None:
            position_ids = torch.full((batch, 1), cache.seen_tokens, device=input_ids.device)
        keep = attention_mask[:, -1:] if attention_mask is not None else torch.ones_like(input_ids)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        compiled = model.config.compile_decode and not self.uncompilable
        key = (batch, keep.dtype, autocast, torch.is_inference_mode_enabled(), compiled)
        # Capture and replay on the model's GPU: a graph captures the current device's work only.
        with torch.cuda.device(input_ids.device):
            if key not in self.graphs:
                graph = self._capture(model, cache, batch, keep.dtype, compiled)
                if graph is None:
                    return None
                key = (*key[:-1], graph.compiled)  # uncompiled where compiling failed
                self.graphs[key] = graph
                while len(self.graphs) > self.MAX_GRAPHS:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            return self.graphs[key](input_ids, position_ids[:, -1:], keep, cache)

    def _capture(
        self, model: nn.Module, cache: RadladsCache, batch: int, mask_dtype, compiled: bool
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
                return DecodeGraph(model, cache, batch, mask_dtype, attempt)
            except Exception as error:  # e.g. a RoPE variant that syncs with the host per step
                what = "compiled CUDA-graph decoding" if attempt else "CUDA-graph decoding"
                logger.warning("%s is off for this model (%s)", what, error)
                self.uncompilable |= attempt
        self.failed = True
        return None


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: nn.Module) -> DecodeGraphs:
    """The decode graphs of `model`; they go when the model goes."""
    if model not in _GRAPHS:
        _GRAPHS[model] = DecodeGraphs()
    return _GRAPHS[model]
