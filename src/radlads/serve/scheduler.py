"""Continuous batching: one thread runs the model; requests join and leave at token boundaries.

Each turn of the loop runs one prefill piece of the oldest admitted prompt (at most
`prefill_chunk_tokens` tokens, so long prompts do not stall the running streams for long), then one
decoding step of every running sequence. A prompt whose prefill is done gets its first token from
the prefill's logits and joins the running batch; a sequence that finishes, or whose client left,
leaves it without disturbing the others. Requests reach the loop through a thread-safe queue; their
tokens go back to the HTTP side as events on the caller's asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from .batch import Running, SequenceCost, cache_bytes, decode_batch, forward, is_student
from .config import ServeConfig
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams, choose_tokens
from .text import TextStream

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 8192


class QueueFull(Exception):
    """More requests wait than the server queues."""


class TooLarge(Exception):
    """A request whose state alone would exceed the server's memory for states."""


@dataclass
class Event:
    """A text delta; the last event of a request also carries why it finished, or its error."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # all generated tokens, on the last event


class Sequence(Running):
    """One request from admission to its last token."""

    def __init__(self, prompt: list[int], params: SamplingParams, engine: Engine):
        super().__init__(prompt)
        self.params = params
        self.sampler = Sampler(params, engine.device)
        self.text = TextStream(engine.tokenizer, params.stop)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.engine = engine
        self.arrived = time.perf_counter()
        self.prefilled = 0
        self.store_points: dict[int, bytes] = {}
        self.cancelled = self.finished = False

    def emit(self, event: Event) -> None:
        if not self.loop.is_closed():  # at shutdown the HTTP side may be gone first
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client left: the loop drops this sequence at its next turn."""
        if not self.finished:
            self.cancelled = True
            self.engine.wake()

    async def stream(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if event.finish_reason or event.error:
                return


class Engine:
    def __init__(self, model, tokenizer, config: ServeConfig, metrics: Metrics | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = metrics or Metrics()
        self.device = model.get_input_embeddings().weight.device
        student = is_student(model)
        self.chunk_tokens = config.prefill_chunk_tokens or (
            getattr(model.config, "prefill_chunk_tokens", None) if student else None
        )
        self.chunk_tokens = self.chunk_tokens or DEFAULT_CHUNK_TOKENS
        self.batch = decode_batch(model, config.max_batch)
        self.prefix_cache = (
            PrefixCache(config.prefix_cache_bytes, config.prefix_block_tokens)
            if student and config.prefix_cache_bytes
            else None
        )
        self.eos = eos_ids(model)
        self.cost = SequenceCost.measure(model) if config.max_state_bytes is not None else None
        self.waiting: deque[Sequence] = deque()  # submitted, not admitted
        self.prefilling: deque[Sequence] = deque()  # admitted, prefilled in arrival order
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="radlads-engine", daemon=True)
        self.metrics.track("radlads_active_streams", "Requests prefilling or decoding", self.active)
        self.metrics.track(
            "radlads_waiting_requests", "Requests queued for a slot", lambda: len(self.waiting)
        )
        self.metrics.track(
            "radlads_state_memory_bytes",
            "Recurrent states and KV caches of admitted requests",
            self.state_bytes,
        )
        self.metrics.track(
            "radlads_prefix_cache_bytes",
            "States held by the prefix-state cache",
            lambda: self.prefix_cache.bytes if self.prefix_cache else 0,
        )

    # --- the HTTP side ---

    def submit(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Queue a request (from the event loop); its events arrive on `Sequence.stream()`."""
        if self.cost is not None:  # before the queue: waiting would not help this one
            need = self._projected_bytes([(len(prompt), params.max_tokens)])
            if need > self.config.max_state_bytes:
                raise TooLarge(
                    f"this request's state would take {need / 1e6:,.1f} MB at {len(prompt)} prompt tokens "
                    f"+ max_tokens {params.max_tokens}, over this server's {self.config.max_state_bytes / 1e6:,.1f} "
                    "MB for states (--max-state-gb); shorten the prompt or lower max_tokens"
                )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
        seq = Sequence(prompt, params, self)
        with self.wakeup:
            self.waiting.append(seq)
            self.wakeup.notify()
        return seq

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def start(self) -> None:
        if self.config.warm_up:
            self.warm_up()
        self.thread.start()

    def warm_up(self) -> None:
        """A throwaway prompt in two pieces (the second continues from a state, as long prompts and
        prefix-cache hits do: another compiled case), then, for a student that stacks its states, a
        step at every batch size (ServeConfig.warm_up says why)."""
        start = time.perf_counter()
        with torch.no_grad():
            ids = torch.zeros(1, min(self.chunk_tokens, 64), dtype=torch.long, device=self.device)
            _, cache = forward(self.model, ids, None)
            _, cache = forward(self.model, ids, cache)
            self.batch.warm_up(cache)
        logger.info("warmed up in %.1f s", time.perf_counter() - start)

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=30)

    def active(self) -> int:
        return len(self.prefilling) + len(self.batch)

    def state_bytes(self) -> int:
        return self.batch.nbytes() + sum(cache_bytes(s.cache) for s in list(self.prefilling))

    # --- the loop ---

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self.wakeup:
                    while not self.stopping and not (self.waiting or self.prefilling or len(self.batch)):
                        self.wakeup.wait()
                    if self.stopping:
                        return self._fail_all("the server is shutting down")
                    self._drop_cancelled()
                    self._admit()
                if self.prefilling:
                    self._guarded(self._prefill_piece, [self.prefilling[0]])
                if len(self.batch):
                    self._guarded(self._decode_step, self.batch.sequences())

    def _guarded(self, work, seqs: list[Sequence]) -> None:
        """Run `work`; if it fails (out of memory, say), fail the sequences it concerned, not the server."""
        try:
            work()
        except Exception as error:
            logger.exception("generation failed for %d request(s)", len(seqs))
            for seq in seqs:
                self._finish(seq, error=f"{type(error).__name__}: {error}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _fail_all(self, why: str) -> None:
        for seq in [*self.waiting, *self.prefilling, *self.batch.sequences()]:
            self._finish(seq, error=why)
        self.waiting.clear()

    def _drop_cancelled(self) -> None:
        for queue in (self.waiting, self.prefilling):
            for seq in [s for s in queue if s.cancelled]:
                queue.remove(seq)
                self._finish(seq, reason="cancelled")
        for seq in [s for s in self.batch.sequences() if s.cancelled]:
            self._finish(seq, reason="cancelled")

    def _admit(self) -> None:
        while self.waiting and self.active() < self.config.max_batch and self._fits(self.waiting[0]):
            self.prefilling.append(self.waiting.popleft())

    def _fits(self, seq: Sequence) -> bool:
        """Whether `seq` joins the admitted requests within max_state_bytes, all counted at their
        longest (prompt + max_tokens). Requests are admitted in order: a large one is not passed."""
        if self.cost is None or not self.active():
            return True
        admitted = [*self.prefilling, *self.batch.sequences(), seq]
        requests = [(len(s.prompt), s.params.max_tokens) for s in admitted]
        return self._projected_bytes(requests) <= self.config.max_state_bytes

    def _projected_bytes(self, requests: list[tuple[int, int]]) -> int:
        """The caches of these (prompt tokens, max_tokens) requests at their longest, in this
        server's batch, plus one prompt's cache beside it (a prefill, or a join copying it in)."""
        batch = self.batch.projected_bytes([p + m for p, m in requests], self.cost)
        return batch + self.cost.fixed + max(p for p, _ in requests) * self.cost.per_token

    def _prefill_piece(self) -> None:
        seq = self.prefilling[0]
        if seq.prefilled == 0 and seq.cache is None and self.prefix_cache is not None:
            self._look_up_prefix(seq)
        end = min(
            [seq.prefilled + self.chunk_tokens, len(seq.prompt)]
            + [p for p in seq.store_points if p > seq.prefilled]
        )
        ids = torch.tensor([seq.prompt[seq.prefilled : end]], device=self.device)
        logits, seq.cache = forward(self.model, ids, seq.cache)
        seq.prefilled = end
        if end in seq.store_points:
            self.prefix_cache.store(seq.store_points[end], seq.cache)
        if end == len(seq.prompt):
            self.prefilling.popleft()
            self.metrics.ttft.observe(time.perf_counter() - seq.arrived)
            self._accept(seq, choose_tokens(logits, [seq.sampler])[0])
            if not seq.finished:
                self.batch.join(seq)

    def _look_up_prefix(self, seq: Sequence) -> None:
        plan = self.prefix_cache.plan(seq.prompt)
        seq.prefilled, seq.cache, seq.store_points = plan.hit, plan.cache, plan.store
        self.metrics.prefix_lookups.labels("hit" if plan.hit else "miss").inc()
        self.metrics.prefix_tokens_skipped.inc(plan.hit)

    def _decode_step(self) -> None:
        seqs, logits = self.batch.step()
        for seq, token in zip(seqs, choose_tokens(logits, [s.sampler for s in seqs])):
            self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        """Take a sequence's new token: emit its text, or finish it."""
        seq.generated.append(token)
        self.metrics.add_tokens(1)
        if token in self.eos and not seq.params.ignore_eos:
            seq.generated.pop()  # the end-of-text token is no text
            return self._finish(seq, reason="stop")
        delta = seq.text.push(token)
        if seq.text.stopped:
            return self._finish(seq, reason="stop", text=delta)
        if len(seq.generated) >= seq.params.max_tokens:
            return self._finish(seq, reason="length", text=delta)
        if delta:
            seq.emit(Event(text=delta))

    def _finish(
        self, seq: Sequence, reason: str | None = None, error: str | None = None, text: str = ""
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self.batch.sequences():
            self.batch.leave(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.cache = None
        self.metrics.requests.labels(reason or "error").inc()
        if reason and reason != "cancelled":
            text += seq.text.finish()
        seq.emit(Event(text, reason, error, prompt_tokens=len(seq.prompt), tokens=list(seq.generated)))


def eos_ids(model) -> set[int]:
    """End-of-text tokens: the generation config's, else the model config's."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = found if found is not None else getattr(model.config, "eos_token_id", None)
    if found is None:
        return set()
    return {found} if isinstance(found, int) else set(found)
