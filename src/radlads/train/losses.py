"""Vocab-sized losses computed a chunk of tokens at a time.

Each chunk's logits are recomputed in backward (activation checkpointing), so neither an fp32
[B, T, V] tensor nor the graph of one is ever held: memory is O(chunk * V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _kl_chunk(
    student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor
) -> Tensor:
    s_logp = F.log_softmax((student_hidden @ student_head.T).float(), dim=-1)
    with torch.no_grad():  # teacher logits are recomputed in backward rather than kept: O(chunk * V)
        t_logp = F.log_softmax((teacher_hidden @ teacher_head.T).float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def chunked_kl(
    student_hidden: Tensor,
    student_head: nn.Linear,
    teacher_hidden: Tensor,
    teacher_head: nn.Linear,
    chunk: int,
) -> Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions (temperature 1)."""
    s, t = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        rows = slice(i, i + chunk)
        total = total + checkpoint(
            _kl_chunk, s[rows], student_head.weight, t[rows], teacher_head.weight, use_reentrant=False
        )
    return total / s.shape[0]


def _ce_chunk(hidden: Tensor, head: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy((hidden @ head.T).float(), labels, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, head: nn.Linear, input_ids: Tensor, chunk: int) -> Tensor:
    """Mean next-token cross-entropy: position t predicts input_ids[t + 1]."""
    h = hidden[:, :-1].flatten(0, 1)
    labels = input_ids[:, 1:].flatten()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(
            _ce_chunk, h[i : i + chunk], head.weight, labels[i : i + chunk], use_reentrant=False
        )
    return total / h.shape[0]
