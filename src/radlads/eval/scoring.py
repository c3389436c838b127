"""Log-likelihood scoring of (context, continuation) pairs, the way lm-evaluation-harness does it.

A request is scored by feeding `context + continuation[:-1]` and summing the log-probabilities
of the continuation tokens. Batches are right-padded: the student is recurrent, and with right
padding every scored position sees exactly its own prefix, whatever the model does with the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Loglik:
    value: float  # sum of log-probs of the continuation tokens
    is_greedy: bool  # every continuation token is the argmax given its prefix


def _encode(tokenizer, text: str) -> list[int]:
    # The harness encodes without special tokens (no BOS) for causal models by default.
    return tokenizer.encode(text, add_special_tokens=False)


def _prefix_token_id(tokenizer) -> int:
    # What the harness conditions on when the context is empty.
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("empty context needs a BOS or EOS token, and the tokenizer has neither")
    return token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as the harness splits them.

    Trailing spaces of the context move to the continuation, because BPE tokenizers attach a space
    to the word after it (" Paris" is one token); then the whole string is encoded once and cut at
    the context's token length, so the continuation is tokenized in context.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [_prefix_token_id(tokenizer)], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def _score_batch(model, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Loglik]:
    inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]
    width = max(len(ids) for ids in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for row, seq in enumerate(inputs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    results = []
    for row, (seq, (_, cont)) in enumerate(zip(inputs, pairs, strict=True)):
        # fp32 log-softmax only over the few continuation positions of this row.
        cont_logits = logits[row, len(seq) - len(cont) : len(seq)].float()
        target = torch.tensor(cont, device=cont_logits.device)
        logprobs = cont_logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((cont_logits.argmax(-1) == target).all())
        results.append(Loglik(float(logprobs.sum()), greedy))
    return results


def score_pairs(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Loglik]:
    """Loglik of each (context ids, continuation ids) pair, in input order."""
    if any(not cont for _, cont in pairs):
        raise ValueError("every continuation must have at least one token")
    model.eval()
    # Longest first, as the harness does: similar lengths share a batch and an OOM shows up at once.
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[Loglik | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="loglikelihood"):
        chunk = order[start : start + batch_size]
        for i, result in zip(chunk, _score_batch(model, [pairs[i] for i in chunk]), strict=True):
            results[i] = result
    return results


def score_requests(
    model, tokenizer, requests: Sequence[Request], *, batch_size: int = 16, progress: bool = False
) -> list[Loglik]:
    pairs = [encode_pair(tokenizer, r.context, r.continuation) for r in requests]
    return score_pairs(model, pairs, batch_size=batch_size, progress=progress)


def multiple_choice_metrics(
    lls: Sequence[Sequence[float]], golds: Sequence[int], choice_lengths: Sequence[Sequence[int]]
) -> dict[str, float]:
    """acc: argmax loglik; acc_norm: argmax loglik / characters of the choice (the harness' rule)."""
    acc = [int(np.argmax(ll)) == gold for ll, gold in zip(lls, golds, strict=True)]
    acc_norm = [
        int(np.argmax(np.asarray(ll) / np.asarray(n, dtype=float))) == gold
        for ll, gold, n in zip(lls, golds, choice_lengths, strict=True)
    ]
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def cloze_metrics(results: Sequence[Loglik]) -> dict[str, float]:
    """LAMBADA-style: acc = greedy match of the whole continuation; perplexity = exp(-mean doc loglik)."""
    return {
        "acc": float(np.mean([r.is_greedy for r in results])),
        "perplexity": math.exp(-float(np.mean([r.value for r in results]))),
    }
