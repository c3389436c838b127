"""Prefill: the decoder layers compiled on CUDA (`compile_prefill`), and long inputs run in pieces
that carry the recurrent state (`prefill_chunk_tokens`), so that a prefill's memory is set by the
piece, not by the context.

Compiled, a layer is one graph: the recurrence without autograd is a custom op
(radlads::recurrence_fwd, kernels.fla_ops), and each layer's state comes in and goes out as an
argument. Eager, a layer launches ~50 small kernels (norms, RoPE, LoRA activations, decay, gating); Inductor
fuses them into a few, which is most of a short prefill's time and much of a long one's.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# fla's chunked kernels work in 64-token chunks: pieces of a multiple of 64 split the input where
# one pass would have split it anyway.
PIECE_MULTIPLE = 64


def call_layer(layer: nn.Module, *args):
    return layer(*args)


# Graphs of the one compiled function: layer 0 (which supplies v_first) or another, a batch of 1
# or more, with a state or from none, with a cache or without, a mask or none: past
# Dynamo's default of 8 (reached in one benchmark run) a new case would run uncompiled (with only
# Dynamo's log line to say so).
RECOMPILE_LIMIT = 64


def mark_sizes_dynamic(hidden, position_embeddings, state, v_first, attention_mask, *rest) -> None:
    """Mark the batch and length dims of a layer call's arguments dynamic before Dynamo sees them:
    the first compile then serves every prompt length and batch size above 1. Left to Dynamo, the
    first call compiles static shapes and the first other length or batch compiles again."""
    sized = [(t, (0, 1)) for t in (hidden, *position_embeddings, v_first, attention_mask)]
    for tensor, dims in [*sized, (state, (0,))]:  # a state's other dims are heads and head size
        if isinstance(tensor, Tensor):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


@functools.cache
def compiled_call_layer(backend: str = "inductor"):
    # One function for all layers: Dynamo takes a layer's parameters as inputs, so every layer runs
    # the same graph (a batch of 1 gets its own: Dynamo specialises sizes of 1).
    compiled = torch.compile(call_layer, backend=backend)

    def call(layer: nn.Module, *args):
        mark_sizes_dynamic(*args)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(layer, *args)

    return call


class CompiledLayers:
    """A model's compiled layer call. Where compiling fails (and the layer then runs eagerly), that
    model's layers run eagerly from then on, after one warning. `enabled`: a switch for this
    process, not saved with the model (training turns it off: its own settings compile layers)."""

    def __init__(self):
        self.enabled = True
        self.failed = False
        self.announced = False

    def applies(self, config, hidden: Tensor) -> bool:
        # Compiling (the decoding step traces the model) and one token come first: Dynamo then
        # reads none of the switches after them, so changing one does not recompile that step.
        return (
            not torch.compiler.is_compiling()
            and hidden.shape[1] > 1
            and hidden.is_cuda
            and not torch.is_grad_enabled()
            and config.compile_prefill
            and self.enabled
            and not self.failed
        )

    def __call__(self, layer: nn.Module, *args):
        if not self.announced:  # the first prefill stalls; say why, once
            logger.warning(
                "compiling the decoder layers for prefill (once, tens of seconds; "
                "config.compile_prefill = False skips it)"
            )
            self.announced = True
        try:
            return compiled_call_layer()(layer, *args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:
            # The layer's state is an argument: nothing was written, so it can run again eagerly.
            # If that fails too, the input was at fault, not the compiler: the user gets its error.
            out = layer(*args)
            logger.warning("compiled prefill is off for this model (%s)", error)
            self.failed = True
            return out


def spans(length: int, batch: int, chunk_tokens: int | None) -> list[tuple[int, int]]:
    """[start, end) pieces of `length` positions with at most `chunk_tokens` tokens over the batch
    each (a multiple of 64 positions, at least 64: a batch of more than chunk_tokens / 64 sequences
    gets pieces of 64 positions, over the limit); one piece where it all fits or there is no limit."""
    if not chunk_tokens or batch * length <= chunk_tokens:
        return [(0, length)]
    step = max(PIECE_MULTIPLE, chunk_tokens // batch // PIECE_MULTIPLE * PIECE_MULTIPLE)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def piece_tokens(config, batch: int) -> int | None:
    """Tokens (over the batch) of a prefill's pieces: `prefill_chunk_tokens`, and for a windowed
    hybrid at most its window and sinks per row (rounded up to whole pieces of 64), so that a
    piece's attention mask, [piece, kept keys + piece], stays small however long the prompt."""
    chunk, slots = config.prefill_chunk_tokens, config.softmax_kv_slots
    if chunk is None or slots is None:
        return chunk
    return min(chunk, batch * -(-slots // PIECE_MULTIPLE) * PIECE_MULTIPLE)


def keep_tail(pieces: list[Tensor], positions: int) -> None:
    """Drop leading pieces ([B, T_i, C]) whose positions none of the last `positions` need
    (0: keep all)."""
    while positions and len(pieces) > 1 and sum(p.shape[1] for p in pieces[1:]) >= positions:
        pieces.pop(0)
