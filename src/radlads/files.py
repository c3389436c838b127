"""Writing files so that a process killed at any moment leaves the old file or the new one, never
half of one: write beside the target, flush to disk, then rename over it (a rename within one
folder is atomic). And one writer per run folder at a time (`claim_folder`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, and no claim on a folder
    fcntl = None

LOCK_NAME = ".radlads.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the folder (`claim_folder`)."""


def partial_path(path: Path) -> Path:
    """Where `path` is written before it is swapped in: one fixed name, so a write that a kill cut
    short is overwritten by the next one rather than left behind."""
    return path.with_name(f".{path.name}.partial")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:  # an error, not a kill: nothing to leave behind
        partial.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def copy_atomic(source: Path, target: Path) -> None:
    partial = partial_path(target)
    shutil.copyfile(source, partial)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, target)


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def claim_folder(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for the block, so that a second run started into it stops with an error that
    names the first, instead of both writing the same checkpoints. The operating system drops the
    claim when the process ends, however it ends: a killed run leaves no stale claim to clear."""
    if fcntl is None:
        yield
        return
    with open(folder / LOCK_NAME, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that did not say which"
            raise FolderInUseError(
                f"{folder} is in use by another {what} ({holder}); wait for it to end, "
                "or give this one another folder"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        lock.flush()
        yield
