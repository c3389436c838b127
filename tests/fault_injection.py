"""`radlads ARGV` in a child process that can SIGKILL itself at the n-th file-system write under a
folder, as a job killed at that moment would be.

Writes are counted where they happen: a file opened for writing (Python's open, which
json/yaml/numpy/DCP/transformers use), a safetensors file, a rename, an unlink, a folder removal.
A kill at a file write first cuts the file to a random prefix (what a kill mid-write leaves); at a
folder removal it first deletes part of the folder; at a rename or unlink it comes just before.
The child runs from a forkserver that has imported torch and radlads already, so a trial costs
its own work, not the imports.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

_real = {
    "open": builtins.open,
    "replace": os.replace,
    "rename": os.rename,
    "unlink": os.unlink,
    "remove": os.remove,
    "rmtree": shutil.rmtree,
}
PRELOAD = [
    "radlads.cli.main",
    "radlads.convert.verify",
    "torch.distributed.checkpoint",
    "torch.utils.tensorboard",
    "transformers.models.llama.modeling_llama",
    "transformers.models.auto.tokenization_auto",
    "gguf",
]


def phase(path: str) -> str:
    """Which part of a conversion writes `path` (relative to the trial's folder)."""
    if path.startswith(("tiny-hf", ".tiny-hf")):
        return "gguf import"
    if path.startswith("out/data/"):
        return "prepare-data"
    if path.startswith("out/checkpoints/"):
        return "checkpoint"
    if path.startswith("out/metrics.jsonl") or path.startswith("out/.metrics.jsonl"):
        return "training log"
    if re.fullmatch(r"out/\.?config(\.\d+)?\.yaml(\.partial)?", path):
        return "run config"
    return "export"


class Writes:
    """Counts the writes under `root`; at write number `kill_at` (1-based) the process dies."""

    def __init__(self, root: Path, kill_at: int | None, seed: int, report: Path):
        self.root, self.kill_at, self.report = Path(root).resolve(), kill_at, report
        self.rng, self.events = random.Random(seed), []

    def event(self, kind: str, path) -> bool:
        """Record one write; whether it is the one to die at."""
        try:
            relative = Path(os.fsdecode(path)).resolve().relative_to(self.root).as_posix()
        except (ValueError, TypeError):
            return False
        if "tensorboard" in relative:  # written by a background thread: no stable count
            return False
        self.events.append((kind, relative, phase(relative)))
        return len(self.events) == self.kill_at

    def die(self, cut: Path | None = None, kept: int = 0) -> None:
        """Die; first cut `cut` to its first `kept` bytes plus a random part of what followed."""
        kind, relative, where = self.events[-1]
        if cut is not None and cut.is_file():
            os.truncate(cut, kept + int((cut.stat().st_size - kept) * self.rng.random()))
        with _real["open"](self.report, "w") as f:
            json.dump({"kind": kind, "path": relative, "phase": where}, f)
        os.kill(os.getpid(), signal.SIGKILL)

    def save_events(self, cpu_seconds: float) -> None:
        with _real["open"](self.report, "w") as f:
            json.dump({"events": self.events, "cpu_seconds": cpu_seconds}, f)


class _DyingFile:
    """A file whose close cuts what was written through it to a prefix and kills the process."""

    def __init__(self, file, path: Path, writes: Writes, kept: int):
        self._file, self._path, self._writes, self._kept = file, path, writes, kept

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._file)

    def close(self):
        self._file.close()
        self._writes.die(cut=self._path, kept=self._kept)


def install(writes: Writes) -> None:
    import safetensors.torch
    import transformers.modeling_utils

    def open_(file, mode="r", *args, **kwargs):
        writing = isinstance(file, str | bytes | os.PathLike) and any(c in mode for c in "wax+")
        kept = os.path.getsize(file) if writing and "a" in mode and os.path.isfile(file) else 0
        f = _real["open"](file, mode, *args, **kwargs)
        if writing and writes.event("write", file):
            return _DyingFile(f, Path(os.fsdecode(file)), writes, kept)
        return f

    def before(name):
        def hooked(path, *args, **kwargs):
            target = args[0] if name in ("replace", "rename") else path
            if writes.event(name, target):
                writes.die()
            return _real[name](path, *args, **kwargs)

        return hooked

    def rmtree(path, *args, **kwargs):
        if writes.event("rmtree", path):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for p in files[: len(files) // 2]:
                p.unlink()
            writes.die()
        return _real["rmtree"](path, *args, **kwargs)

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if writes.event("write", filename):
            writes.die(cut=Path(filename))

    builtins.open = io.open = open_
    for name in ("replace", "rename", "unlink", "remove"):
        setattr(os, name, before(name))
    shutil.rmtree = rmtree
    safetensors.torch.save_file = transformers.modeling_utils.safe_save_file = save_file


def ready() -> None:
    """A child that does nothing: starting it starts the forkserver, imports and all."""


def die_after_cpu(seconds: float) -> None:
    """SIGKILL this process once it has run `seconds` of CPU time: a moment in its work that does
    not move with the load of the machine, as a wall-clock delay would."""
    start = time.process_time()

    def watch():
        while time.process_time() - start < seconds:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def run(
    argv: list[str],
    root: Path,
    report: Path,
    kill_at: int | None = None,
    seed: int = 0,
    cpu: float | None = None,
) -> None:
    """The child's entry point: count (and maybe die at) the writes of `radlads ARGV` under `root`,
    or die after `cpu` seconds of CPU time."""
    import torch

    torch.set_num_threads(1)  # one thread: CPU time and results do not depend on the machine's load
    from radlads.cli.main import main

    start = time.process_time()
    if cpu is not None:
        die_after_cpu(cpu)
    writes = Writes(root, kill_at, seed, report)
    install(writes)
    code = main(argv)
    if kill_at is None:
        writes.save_events(time.process_time() - start)
    sys.exit(code)
