"""ServeConfig: every knob of `radlads serve`, defaulted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only unless asked: the server has no TLS
    port: int = 8000
    max_batch: int = 64  # sequences decoding (or waiting for their prefill) at once
    max_prompt_tokens: int = 32768
    max_new_tokens: int = 8192  # a request asking for more is refused
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`
    model_name: str | None = None  # the id clients pass as `model` (default: the folder's name)
    # Tokens a prefill runs at once before the running streams get their next token (None: the
    # student's `prefill_chunk_tokens`, else 8192).
    prefill_chunk_tokens: int | None = None
    prefix_cache_bytes: int = 1 << 30  # 0 switches the prefix-state cache off
    prefix_block_tokens: int = 64  # prefixes are cached at multiples of this
    max_waiting: int = 1024  # requests queued beyond the running batch; more get 429
    # Compile the prefill and compile and capture the decoding step at every batch size the
    # running batch can take before serving, rather than stalling every running stream the first
    # time the load reaches a new size (each takes seconds to a minute on a GPU).
    warm_up: bool = True
    # Bytes the running requests' states and KV caches may take, as they will be at their
    # max_tokens: a request waits until it fits, and one that could never fit is refused (400).
    # None: no limit (only max_batch bounds them).
    max_state_bytes: int | None = None
    # A hybrid student's softmax layers over this window and these sinks, whatever it was saved
    # with: a KV cache of a fixed size, whose streams stack as a pure student's (None: as saved).
    softmax_window: int | None = None
    softmax_sinks: int | None = None

    def __post_init__(self):
        for name in (
            "max_batch",
            "max_prompt_tokens",
            "max_new_tokens",
            "prefix_block_tokens",
            "max_waiting",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_state_bytes is not None and self.max_state_bytes < 1:
            raise ValueError(f"max_state_bytes must be positive or None, got {self.max_state_bytes}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be 0 (off) or more, got {self.prefix_cache_bytes}")
        if self.api_key == "":  # would let a bare `Authorization: Bearer` through
            raise ValueError("api_key is empty: give a key, or none to serve without one")
