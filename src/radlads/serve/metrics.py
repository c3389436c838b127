"""Prometheus metrics of one server (its own registry, so several servers share a process)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW_S = 10.0


class TokenRate:
    """Tokens per second over the last RATE_WINDOW_S seconds."""

    def __init__(self):
        self.events: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.events.append((time.monotonic(), count))

    def per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.events and self.events[0][0] < now - RATE_WINDOW_S:
                self.events.popleft()
            return sum(count for _, count in self.events) / RATE_WINDOW_S


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "radlads_requests",
            "Requests by outcome: stop, length, cancelled (client left), error, rejected (4xx)",
            ["outcome"],
            registry=registry,
        )
        self.generated_tokens = Counter("radlads_generated_tokens", "Tokens generated", registry=registry)
        self.rate = TokenRate()
        Gauge(
            "radlads_generated_tokens_per_second",
            f"Tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
            registry=registry,
        ).set_function(self.rate.per_second)
        self.ttft = Histogram(
            "radlads_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.prefix_lookups = Counter(
            "radlads_prefix_cache_lookups",
            "Prefix-state cache lookups by result",
            ["result"],
            registry=registry,
        )
        self.prefix_tokens_skipped = Counter(
            "radlads_prefix_cache_skipped_tokens",
            "Prompt tokens not prefilled thanks to the cache",
            registry=registry,
        )

    def track(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read from the server's state at each scrape."""
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def add_tokens(self, count: int) -> None:
        self.generated_tokens.inc(count)
        self.rate.add(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
