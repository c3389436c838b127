"""Perplexity over fixed token windows, with the mean loss at every position of the window.

The per-position curve is what shows whether a recurrent student keeps up with the teacher late
in a long context, which one averaged perplexity hides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float
    tokens: int  # number of predicted tokens
    # loss_by_position[i]: mean loss of predicting token i+1 from tokens 0..i; length T-1 for windows
    # of T tokens, since the first token of a window has no prediction.
    loss_by_position: np.ndarray


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_len: int = 128) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in fp32, upcasting `chunk_len` positions of the logits at a time.

    Upcasting a bf16 [B, T, V] all at once would double the largest activation of the whole eval.
    """
    losses = [
        torch.nn.functional.cross_entropy(
            logits[:, s : s + chunk_len].float().transpose(1, 2),
            targets[:, s : s + chunk_len],
            reduction="none",
        )
        for s in range(0, targets.shape[1], chunk_len)
    ]
    return torch.cat(losses, dim=1)


@torch.no_grad()
def evaluate_perplexity(
    model,
    token_windows: Iterable[torch.Tensor],
    *,
    chunk_len: int = 128,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on batches of token windows (LongTensor [B, T] each, no padding).

    Windows may differ in length between batches; each position is averaged over the windows long
    enough to have it.
    """
    model.eval()
    loss_sum = np.zeros(0)
    count = np.zeros(0)
    for ids in tqdm(token_windows, disable=not progress, desc="perplexity"):
        ids = ids.to(model.device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        nll = token_nll(logits, ids[:, 1:], chunk_len).sum(0).double().cpu().numpy()
        if len(nll) > len(loss_sum):
            loss_sum = np.pad(loss_sum, (0, len(nll) - len(loss_sum)))
            count = np.pad(count, (0, len(nll) - len(count)))
        loss_sum[: len(nll)] += nll
        count[: len(nll)] += ids.shape[0]
    if not count.any():
        raise ValueError("no tokens to score: give at least one window of 2 or more tokens")
    mean_nll = float(loss_sum.sum() / count.sum())
    return PerplexityResult(
        nll=mean_nll,
        ppl=math.exp(mean_nll),
        tokens=int(count.sum()),
        loss_by_position=loss_sum / count,
    )
