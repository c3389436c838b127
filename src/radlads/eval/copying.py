"""Copying by distance: can the model repeat a span of random tokens it saw D tokens earlier?

Each probe is [16 random tokens][a span of 32 random tokens][D other random tokens][the span
again]. Nothing predicts a random token except an earlier copy of it, so the loss on the repeat
against the loss on the first occurrence measures in-context copying (the induction pattern of
Olsson et al., 2022) at distance D, apart from any knowledge of the language. A softmax teacher
copies at every distance within its context; a recurrent student must hold the span in its
state. The same token ids go to student and teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

PREFIX, SPAN = 16, 32


@dataclass
class CopyResult:
    records: list[dict] = field(default_factory=list)  # one per probe: distance, first, repeat (mean NLL)

    def by_distance(self) -> dict[int, dict[str, float]]:
        """distance -> mean NLL (nats) on the span's first occurrence and on its repeat."""
        groups: dict[int, list[dict]] = {}
        for record in self.records:
            groups.setdefault(record["distance"], []).append(record)
        return {
            d: {k: sum(r[k] for r in rs) / len(rs) for k in ("first", "repeat")}
            for d, rs in sorted(groups.items())
        }


def copy_probe(generator: torch.Generator, token_ids: torch.Tensor, distance: int) -> torch.Tensor:
    """One probe's token ids, [PREFIX + SPAN + distance + SPAN], drawn from `token_ids`."""
    draw = token_ids[torch.randint(len(token_ids), (PREFIX + SPAN + distance,), generator=generator)]
    span = draw[PREFIX : PREFIX + SPAN]
    return torch.cat([draw, span])


def span_nll(model, ids: torch.Tensor, distance: int) -> tuple[float, float]:
    """Mean NLL over the span's first occurrence and over its repeat, leaving out each one's first
    token (in the repeat only the tokens after it can be copied)."""
    logits = model(input_ids=ids[None].to(model.device), use_cache=False).logits[0]

    def mean_nll(start: int) -> float:
        # Only the span's rows in fp32: the whole [T, vocab] would be gigabytes at long distances.
        rows = logits[start : start + SPAN - 1].float()  # row p predicts token p + 1
        return torch.nn.functional.cross_entropy(rows, ids[start + 1 : start + SPAN].to(rows.device)).item()

    return mean_nll(PREFIX), mean_nll(PREFIX + SPAN + distance)


def ordinary_token_ids(tokenizer) -> torch.Tensor:
    """Every id of the tokenizer's vocabulary except its special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


@torch.no_grad()
def evaluate_copying(
    model,
    tokenizer,
    distances: Sequence[int] = (0, 256, 1024, 4096),
    *,
    trials: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> CopyResult:
    """`trials` probes per distance, the same ones for any model given the same tokenizer and seed."""
    model.eval()
    token_ids = ordinary_token_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    result = CopyResult()
    grid = [(d, t) for d in distances for t in range(trials)]
    for distance, _ in tqdm(grid, disable=not progress, desc="copying"):
        first, repeat = span_nll(model, copy_probe(generator, token_ids, distance), distance)
        result.records.append({"distance": distance, "first": first, "repeat": repeat})
    return result
