"""Which layers a hybrid student keeps as softmax attention: the teacher's induction layers.

A time mixer carries the past in a fixed-size state, and what it rebuilds worst is copying from
context: looking up where the current token occurred before and predicting what came next, the job
of the teacher's induction heads. `--softmax-layers auto:N` keeps the N layers with the strongest
induction head, measured on random tokens shown twice, so no data is needed. On SmolLM2-135M they
are layers 18 and 17 (0.86 and 0.75 of a head's weight on the right token, no other layer above
0.43); keeping those two, a 150M-token conversion retrieved every passkey the teacher did and ended
0.05 nats below the teacher past 1,024 tokens, where the pure student was 0.17 above and retrieved
none (docs/results/smollm2-135m.md).

`attention_reach` measures another candidate, how far a layer's attention spreads. On that teacher
the farthest-reaching layers (4 and 7) hold no induction head; a hybrid keeping them has not been
trained (scripts/attention_reach.py records both measures).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

AUTO = re.compile(r"auto:(\d+)")


def auto_count(spec) -> int | None:
    """N for a `softmax_layers` of "auto:N", None for a list of layers."""
    if not isinstance(spec, str):
        return None
    match = AUTO.fullmatch(spec)
    if match is None:
        raise ValueError(f"softmax_layers {spec!r}: give layer numbers (e.g. 10,20) or auto:N (e.g. auto:2)")
    return int(match.group(1))


@dataclass
class Reach:
    """Per layer, the attention weight that late queries put on distant tokens (attention sinks left
    out) and on the sinks, averaged over heads and sequences."""

    beyond: dict[int, list[float]]  # tokens back -> per layer
    sinks: list[float]


@torch.no_grad()
def attention_reach(
    teacher, input_ids: Tensor, distances: tuple[int, ...] = (256,), sink_tokens: int = 4, late: float = 0.25
) -> Reach:
    """The weight that the last `late` share of positions put on tokens more than each of
    `distances` back, the first `sink_tokens` left out, and on those first tokens."""
    T = input_ids.shape[1]
    if T <= max(distances) + sink_tokens:
        raise ValueError(
            f"attention reach beyond {max(distances)} tokens needs windows longer than {T} tokens"
        )
    queries = torch.arange(int(T * (1 - late)), T, device=input_ids.device)[:, None]
    keys = torch.arange(T, device=input_ids.device)[None]
    masks = [((queries - keys > d) & (keys >= sink_tokens)).float() for d in distances]
    masks.append((keys < sink_tokens).float().expand(len(queries), T))

    def reduce(w: Tensor) -> Tensor:
        late_queries = w[:, :, queries[:, 0]].float()
        return torch.stack([(late_queries * m).sum(-1).mean() for m in masks])

    per_layer = per_layer_attention(teacher, input_ids, reduce)
    table = torch.stack(per_layer).T.tolist()  # [len(distances) + 1][layers]
    return Reach(dict(zip(distances, table)), table[-1])


@torch.no_grad()
def per_layer_attention(teacher, input_ids: Tensor, reduce) -> list[Tensor]:
    """`reduce(weights)` of each layer's attention weights [B, heads, T, T], in layer order: reduced
    as they are formed, so that no more than one layer's weights are held at a time."""
    per_layer: list[Tensor] = []

    def hook(module, args, output):
        per_layer.append(reduce(output[1]))
        return output[0], None  # nothing downstream needs the weights

    previous = teacher.config._attn_implementation
    teacher.set_attn_implementation("eager")  # the fused kernels never form the weights
    handles = [layer.self_attn.register_forward_hook(hook) for layer in teacher.model.layers]
    try:
        teacher(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
        teacher.set_attn_implementation(previous)
    return per_layer


@dataclass
class CopyHeads:
    """Per layer, the strongest head of each kind (mean attention weight, max over heads) on
    sequences of random tokens shown twice. An induction head looks, from a token's second
    occurrence, at the token that followed its first: the circuit that copies from context, which a
    fixed-size state has to rebuild. A previous-token head looks one token back."""

    induction: list[float]
    previous_token: list[float]


@torch.no_grad()
def copy_heads(teacher, vocab_size: int, length: int = 128, batch: int = 4, seed: int = 0) -> CopyHeads:
    """Induction and previous-token scores of each layer on `batch` blocks of `length` random tokens,
    each repeated once."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(vocab_size, (batch, length), generator=g)
    ids = torch.cat([block, block], 1).to(next(teacher.parameters()).device)
    per_layer = per_layer_attention(teacher, ids, lambda w: copy_scores(w, length))
    return CopyHeads(*torch.stack(per_layer).T.tolist())


def copy_scores(weights: Tensor, length: int) -> Tensor:
    """[induction, previous-token] of the strongest head, from attention weights [B, heads, 2L, 2L]
    over L random tokens shown twice."""
    t = torch.arange(length, 2 * length - 1, device=weights.device)  # second copy, next token known
    every = torch.arange(1, 2 * length, device=weights.device)
    induction = weights[:, :, t, t - length + 1].float().mean((0, 2))  # per head
    previous = weights[:, :, every, every - 1].float().mean((0, 2))
    return torch.stack([induction.max(), previous.max()])


def strongest(scores: list[float], n: int) -> list[int]:
    """The `n` layers of highest score, in layer order."""
    if not 0 < n < len(scores):
        raise ValueError(
            f"auto:{n} must keep between 1 and {len(scores) - 1} of the teacher's {len(scores)} layers"
        )
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n])
