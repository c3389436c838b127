"""Choosing each sequence's next token: greedy at temperature 0, else sampled with its own
temperature, top-p and seeded generator (transformers' logits warpers)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode exactly max_tokens (benchmarks)


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.greedy = params.temperature == 0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device).manual_seed(seed)

    def sample(self, logits: Tensor) -> Tensor:
        """One token id from a [V] row of logits."""
        # Shifted so the largest is 0 (the same distribution): a tiny temperature then sends the
        # others towards -inf instead of the largest to +inf, whose softmax is NaN.
        logits = logits.float()
        scores = self.warpers(None, (logits - logits.max())[None])
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[0, 0]


def choose_tokens(logits: Tensor, samplers: list[Sampler]) -> list[int]:
    """Next tokens of a [B, V] batch, one sampler per row; one host sync for the whole batch."""
    tokens = logits.argmax(-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[row] = sampler.sample(logits[row])
    return tokens.tolist()
