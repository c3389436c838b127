"""Which layers a hybrid student keeps as softmax attention: where the teacher's attention reaches farthest.

A time mixer carries the past in a fixed-size state; the teacher's layers that spread their attention
over distant tokens are the ones it has most to summarise for. Attention sinks (heads parking their
weight on the first tokens, as an off switch) are not reach: a state holds them for free. On
SmolLM2-135M at 2048 tokens, layers 3-8 put 55-67% of their late queries' weight more than 256
tokens back, layers 12-29 at most 27% (their sinks take 28-64%) (docs/results/smollm2-135m.md).

`--softmax-layers auto:N` keeps the N layers of greatest reach, measured on held-out text. Reach is
weight, not need: on that teacher the layers whose long reach its own late-position loss needs most
(20 and 8, scripts/attention_reach.py) are not the two of greatest weight (7 and 4). Which choice
makes the better hybrid is not measured yet.
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


def farthest_reaching(reach: list[float], n: int) -> list[int]:
    """The `n` layers of greatest reach, in layer order."""
    if not 0 < n < len(reach):
        raise ValueError(
            f"auto:{n} must keep between 1 and {len(reach) - 1} of the teacher's {len(reach)} layers"
        )
    return sorted(sorted(range(len(reach)), key=lambda i: -reach[i])[:n])
