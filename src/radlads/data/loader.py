"""Fixed-length training windows from a shard's flat token stream."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from radlads.data.index import ShardIndex


class PackedLoader:
    """Yields LongTensor [batch_size, seq_len] windows cut from the packed token stream.

    train: the stream is cut into non-overlapping windows; each epoch visits them in a seeded
    random order and the epochs run on forever (a batch may straddle two epochs). Position is
    counted in windows of the global batch (batch_size * world_size), so `state_dict` is the
    same on every rank, and rank r takes every world_size-th window of each global batch.

    heldout: each iteration is one pass in stream order over the full global batches, and
    leaves the state alone, so evaluations always see the same batches.

    repeat_fraction (train only): in that fraction of the windows, drawn from the seed, a
    span of 1/8 to 1/2 of the window is shown again right after itself. Ordinary text seldom
    repeats itself, so a student distilled on it alone rarely sees the teacher's induction heads
    at work, the lookup that copies from context (docs/results/smollm2-135m.md).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike[str],
        seq_len: int,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        repeat_fraction: float = 0.0,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError("seq_len, batch_size and world_size must be positive")
        if not 0.0 <= repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must be in [0, 1], got {repeat_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        index = ShardIndex.load(shard_dir)
        path = index.split_path(split)
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.position = seed, 0, 0
        self.shuffle = split == "train"
        self.repeat_fraction = repeat_fraction if self.shuffle else 0.0
        available = index.splits[split].tokens
        needed = seq_len if self.shuffle else seq_len * self.global_batch
        if available < needed and not self.shuffle and (why := index.empty_heldout()):
            raise ValueError(f"{shard_dir}: {why}")
        if available < needed:
            what = (
                f"one window of seq_len={seq_len}"
                if self.shuffle
                else f"one evaluation batch (seq_len x batch_size x world_size = "
                f"{seq_len} x {batch_size} x {world_size})"
            )
            raise ValueError(
                f"the '{split}' split in {shard_dir} has {available} tokens, but {what} needs {needed}; "
                "add text or lower seq_len/batch_size"
            )
        self.num_windows = available // seq_len
        self._tokens = np.memmap(path, dtype=index.dtype, mode="r", shape=(self.num_windows * seq_len,))
        self._permutation: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.shuffle:
            yield from self._ordered_pass()
            return
        while True:
            yield self._windows_to_batch(self._next_global_windows())

    def _ordered_pass(self) -> Iterator[torch.Tensor]:
        last_start = self.num_windows - self.global_batch
        for start in range(0, last_start + 1, self.global_batch):
            yield self._windows_to_batch(np.arange(start, start + self.global_batch))

    def _next_global_windows(self) -> np.ndarray:
        """Advance the state by one global batch and return its window ids."""
        parts = []
        wanted = self.global_batch
        while wanted:
            taken = self._epoch_permutation()[self.position : self.position + wanted]
            parts.append(taken)
            wanted -= len(taken)
            self.position += len(taken)
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _epoch_permutation(self) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._permutation = (self.epoch, rng.permutation(self.num_windows))
        return self._permutation[1]

    def _windows_to_batch(self, global_windows: np.ndarray) -> torch.Tensor:
        mine = global_windows[self.rank :: self.world_size]
        rows = [self._window(w) for w in mine]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _repeated_span(self, w: int) -> tuple[int, int]:
        """(length, start) of the span window w shows twice, length 0 for none. Drawn from the seed
        and the window alone, so the same on every rank, epoch and resume; lengths from 1/8 to 1/2
        of the window, so that the second sight comes at many distances from the first."""
        if not self.repeat_fraction or self.seq_len < 2:  # one token cannot be shown twice
            return 0, 0
        rng = np.random.default_rng([self.seed, 1, int(w)])
        if rng.random() >= self.repeat_fraction:
            return 0, 0
        length = int(rng.integers(max(1, self.seq_len // 8), self.seq_len // 2 + 1))
        return length, int(rng.integers(0, self.seq_len - 2 * length + 1))

    def _window(self, w: int) -> np.ndarray:
        """Window w's tokens; for a repeated one, its span shown again right after itself, and
        the rest of the window after that, cut to seq_len."""
        tokens = self._tokens[w * self.seq_len : (w + 1) * self.seq_len]
        length, start = self._repeated_span(w)
        if not length:
            return tokens
        end = start + length
        return np.concatenate([tokens[:end], tokens[start:end], tokens[end : self.seq_len - length]])

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped (batch_size and world_size may differ)."""
        saved = (state["seq_len"], state["num_windows"])
        if saved != (self.seq_len, self.num_windows):
            raise ValueError(
                f"loader state is for seq_len={saved[0]} over {saved[1]} windows, but this loader has "
                f"seq_len={self.seq_len} over {self.num_windows} windows (different shards or seq_len): resume "
                f"with the run's --seq-len {saved[0]} and data, or delete the step's checkpoint to restart it"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._permutation = None
