"""The shard index (index.json): what a shard folder holds and how it was made."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radlads.files import write_json_atomic

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class PrepareSettings:
    """Options that change which tokens land in which split; a reused index must match them."""

    held_out_fraction: float
    held_out_tokens: int | None
    append_eos: bool
    seed: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.held_out_tokens is not None and self.held_out_tokens < 0:
            raise ValueError(f"held_out_tokens must be >= 0, got {self.held_out_tokens}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass
class SplitInfo:
    file: str
    documents: int = 0
    tokens: int = 0


@dataclass
class SourceInfo:
    name: str
    path: str
    licence: str | None
    fingerprint: str  # of the source's file list, sizes and mtimes; see shards.source_fingerprint
    documents: int = 0
    tokens: int = 0
    duplicates: int = 0


@dataclass
class ShardIndex:
    dtype: str
    tokenizer_name: str
    tokenizer_hash: str
    vocab_size: int
    eos_id: int | None
    settings: PrepareSettings
    splits: dict[str, SplitInfo]
    sources: list[SourceInfo]
    format_version: int = FORMAT_VERSION
    # What the tokenizer does (data.tokenizer.tokenizer_ids_hash); None in indexes written before
    # radlads recorded it, whose tokenizer must then match `tokenizer_hash` exactly.
    tokenizer_ids_hash: str | None = None
    # Where the index was loaded from or written to; not stored in index.json.
    directory: Path | None = field(default=None, compare=False, repr=False)

    def empty_heldout(self) -> str | None:
        """Why the held-out split is empty and what to do, or None if it is not: documents are held
        out whole, so a corpus of few large ones often holds none out."""
        fraction, tokens = self.settings.held_out_fraction, self.settings.held_out_tokens
        if self.splits["heldout"].tokens or (fraction if tokens is None else tokens) == 0:
            return None  # not empty, or asked to be
        share = (
            f"each with probability {fraction:g}, by a hash of its text"
            if tokens is None
            else f"{tokens} tokens of whole documents"
        )
        return (
            f"the held-out split is empty: none of the corpus's {self.splits['train'].documents} "
            f"document(s) went to it ({share}), so no held-out loss can be scored; give more, smaller "
            "documents (one per JSONL line or .txt file; a .txt of up to 1M characters is one "
            "document) or a larger --held-out-fraction"
        )

    def split_path(self, split: str) -> Path:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this shard has {sorted(self.splits)}")
        if self.directory is None:
            raise ValueError("this index has no directory; load it with ShardIndex.load(dir)")
        return self.directory / self.splits[split].file

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["directory"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | None = None) -> ShardIndex:
        data = dict(data)
        data["settings"] = PrepareSettings(**data["settings"])
        data["splits"] = {name: SplitInfo(**info) for name, info in data["splits"].items()}
        data["sources"] = [SourceInfo(**info) for info in data["sources"]]
        return cls(**data, directory=directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ShardIndex:
        """Load and validate a shard folder's index (token files present, sizes matching)."""
        root = Path(directory)
        path = root / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {INDEX_NAME} in {root}; run `radlads prepare-data` to make shards")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {data.get('format_version')}, this radlads reads "
                f"{FORMAT_VERSION}; re-run `radlads prepare-data`"
            )
        index = cls.from_dict(data, directory=root)
        index.validate_files()
        return index

    def validate_files(self) -> None:
        itemsize = np.dtype(self.dtype).itemsize
        for name, info in self.splits.items():
            path = self.split_path(name)
            expected = info.tokens * itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                raise ValueError(
                    f"{path}: expected {expected} bytes ({info.tokens} tokens), found "
                    f"{'no file' if actual is None else f'{actual} bytes'}; re-run `radlads prepare-data`"
                )

    def save(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        write_json_atomic(self.directory / INDEX_NAME, self.to_dict(), indent=2)
