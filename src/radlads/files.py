"""Writing files so that a process killed at any moment leaves the old file or the new one, never
half of one: write beside the target, flush to disk, then rename over it (a rename within one
folder is atomic)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


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
