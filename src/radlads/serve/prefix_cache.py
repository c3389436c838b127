"""Prefix-state cache: a student's state after a prompt prefix, keyed by that prefix's tokens.

A recurrent state has the same size after 100 tokens as after 100,000, so the state after a long
shared prefix (a system prompt, a document asked several questions) is cheap to keep and lets a
later prompt that starts with it skip that part of its prefill. Prefixes are cut at multiples of
`block_tokens` and keyed by a hash chained over their blocks. States are kept where sharing showed
up, not at every block: at the end of each prompt (its last block boundary, so an identical
prompt is a hit) and where a prompt first leaves a prefix an earlier prompt had (so the third
prompt sharing a document with two others is a hit). Least recently used states go first once the
cache holds more than `max_bytes`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from ..models.cache import RadladsCache


def block_keys(tokens: list[int], block: int) -> list[bytes]:
    """keys[i] identifies tokens[: (i + 1) * block] (whole blocks only)."""
    keys, key = [], b""
    for start in range(0, len(tokens) - block + 1, block):
        piece = array("q", tokens[start : start + block]).tobytes()
        key = hashlib.blake2b(key + piece, digest_size=16).digest()
        keys.append(key)
    return keys


def clone_cache(cache: RadladsCache) -> RadladsCache:
    copy = RadladsCache(len(cache))
    copy.states = [
        tuple(t.clone() for t in s) if isinstance(s, tuple) else s.clone() if s is not None else None
        for s in cache.states
    ]
    copy.seen_tokens = cache.seen_tokens
    return copy


@dataclass
class PrefixPlan:
    """What a prompt gets from the cache: `hit` tokens already run (`cache` holds the state after
    them, None when hit is 0) and the prefix lengths whose states to store, with their keys."""

    hit: int = 0
    cache: RadladsCache | None = None
    store: dict[int, bytes] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int, max_seen: int = 1 << 17):
        self.max_bytes, self.block, self.max_seen = max_bytes, block_tokens, max_seen
        self.entries: OrderedDict[bytes, RadladsCache] = OrderedDict()
        self.seen: OrderedDict[bytes, None] = OrderedDict()  # prefixes of recent prompts, no state
        self.bytes = 0
        self.hits = self.misses = 0

    def plan(self, prompt: list[int]) -> PrefixPlan:
        # At least one prompt token is left to run: its logits give the first new token.
        keys = block_keys(prompt[:-1], self.block)
        cached = max((i + 1 for i, k in enumerate(keys) if k in self.entries), default=0)
        shared = max((i + 1 for i, k in enumerate(keys) if k in self.seen), default=0)
        for key in keys:
            self.seen[key] = None
            self.seen.move_to_end(key)
        while len(self.seen) > self.max_seen:
            self.seen.popitem(last=False)
        plan = PrefixPlan(hit=cached * self.block)
        if cached:
            self.hits += 1
            self.entries.move_to_end(keys[cached - 1])
            plan.cache = clone_cache(self.entries[keys[cached - 1]])
        else:
            self.misses += 1
        for blocks in {shared, len(keys)} - {0}:
            if blocks > cached:
                plan.store[blocks * self.block] = keys[blocks - 1]
        return plan

    def store(self, key: bytes, cache: RadladsCache) -> None:
        size = cache.nbytes()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = clone_cache(cache)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes()
