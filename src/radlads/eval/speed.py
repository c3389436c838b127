"""Generation speed and memory through the model's own `generate()`.

One `generate(max_new_tokens=n)` call is timed as users run it, with a streamer that stamps each
token as generate() hands it out: prefill is the time to the first new token, decode the time from
it to the last (n - 1 single-token steps fed from the cache). Both come from the same call, so
decode is not the difference of two noisy timings. Random token ids: speed does not depend on the
text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock(BaseStreamer):
    """Stamps what generate() hands a streamer: the prompt first, then each new token; then end()."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.put(None)


@torch.no_grad()
def _timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds to the first new token (prefill) and from it to the last (decode), of one call."""
    clock = _Clock(input_ids.device)
    _sync(input_ids.device)
    start = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,  # silences the "no pad token" warning; nothing is padded
        streamer=clock,
    )
    first_token, last = clock.stamps[1], clock.stamps[-1]
    return first_token - start, last - first_token


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_memory(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float | None, str | None]:
    """Peak memory of one full generate call: CUDA allocator peak, or growth of the process' peak RSS.

    The CPU number only grows when this call exceeds every earlier peak of the process, so it is a
    lower bound on what the call needs, not the model's footprint.
    """
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _timed_generate(model, input_ids, new_tokens)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    if resource is None:
        return None, None
    before = _max_rss_mb()
    _timed_generate(model, input_ids, new_tokens)
    return _max_rss_mb() - before, "cpu_max_rss_growth"


def bench_generate(
    model,
    context_lengths: Sequence[int],
    batch_size: int = 1,
    new_tokens: int = 128,
    *,
    seed: int = 0,
) -> list[dict]:
    """One row per context length: prefill and decode tokens/s and peak memory."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2: the first new token comes from the prefill")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in context_lengths:
        ids = torch.randint(model.config.vocab_size, (batch_size, length), generator=generator)
        ids = ids.to(model.device)
        # The memory run comes first (the CPU high-water mark only moves on a new peak) and doubles
        # as warm-up, so kernel compilation and allocator growth are not timed.
        peak_mb, memory_source = _peak_memory(model, ids, new_tokens)
        prefill_s, decode_s = _timed_generate(model, ids, new_tokens)
        rows.append(
            {
                "context_length": length,
                "batch_size": batch_size,
                "new_tokens": new_tokens,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "prefill_tok_s": batch_size * length / prefill_s,
                "decode_tok_s": batch_size * (new_tokens - 1) / decode_s,
                "peak_memory_mb": peak_mb,
                "memory_source": memory_source,
            }
        )
    return rows
