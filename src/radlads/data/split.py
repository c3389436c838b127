"""Route each document to the train or held-out split, by a seeded hash of its text.

The choice depends only on the text and the seed, never on file order, so the same corpus
always gives the same held-out set and a document is never in both splits.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from itertools import count

import numpy as np

Routed = Iterator[tuple[str, np.ndarray]]


def document_key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64


class FractionSplitter:
    """About `fraction` of the documents go to held-out (streamed, nothing buffered)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def add(self, key: float, tokens: np.ndarray) -> Routed:
        yield ("heldout" if key < self.fraction else "train"), tokens

    def finish(self) -> Routed:
        yield from ()


class TokenBudgetSplitter:
    """Held-out = the documents with the smallest keys whose tokens fit in `budget`.

    Only held-out candidates are buffered (at most `budget` tokens); a candidate pushed out by
    a document with a smaller key goes to train.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0
        # Once a document was pushed out, any later one with a larger key must go to train too,
        # or the held-out set would depend on document order.
        self.cutoff = float("inf")
        self._heap: list[tuple[float, int, np.ndarray]] = []  # max-heap on key via negation
        self._tiebreak = count()

    def add(self, key: float, tokens: np.ndarray) -> Routed:
        if key >= self.cutoff:
            yield "train", tokens
            return
        heapq.heappush(self._heap, (-key, next(self._tiebreak), tokens))
        self.total += len(tokens)
        while self.total > self.budget:
            neg_key, _, evicted = heapq.heappop(self._heap)
            self.cutoff = -neg_key
            self.total -= len(evicted)
            yield "train", evicted

    def finish(self) -> Routed:
        for _, _, tokens in sorted(self._heap, key=lambda item: (-item[0], item[1])):
            yield "heldout", tokens
        self._heap = []
