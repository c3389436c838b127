"""Tokenize text sources into flat token files plus an index (see index.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from radlads.data.index import INDEX_NAME, SPLITS, PrepareSettings, ShardIndex, SourceInfo, SplitInfo
from radlads.data.split import FractionSplitter, TokenBudgetSplitter, document_key
from radlads.data.text import (
    ACCEPTED_SUFFIXES,
    Deduplicator,
    StrPath,
    iter_documents,
    scan_input_files,
)
from radlads.data.tokenizer import (
    TokenizerLike,
    load_tokenizer,
    made_with,
    tokenizer_hash,
    tokenizer_ids_hash,
)

logger = logging.getLogger(__name__)

TOKENIZE_BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class Source:
    """A file or folder of text, with the name and licence recorded in the index."""

    path: StrPath
    name: str | None = None
    licence: str | None = None


def prepare_shards(
    sources: StrPath | Source | Iterable[StrPath | Source],
    tokenizer: TokenizerLike,
    out_dir: StrPath,
    *,
    held_out_fraction: float = 0.01,
    held_out_tokens: int | None = None,
    append_eos: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ShardIndex:
    """Tokenize `sources` with `tokenizer` into `out_dir` (train.bin, heldout.bin, index.json).

    `held_out_tokens`, when given, replaces `held_out_fraction`: the held-out split is then a
    seeded-hash sample of documents holding at most that many tokens. If `out_dir` already holds
    a valid index for the same tokenizer, sources and settings, it is returned untouched.
    """
    tok = load_tokenizer(tokenizer)
    if append_eos and tok.eos_token_id is None:
        raise ValueError(f"tokenizer '{tok.name_or_path}' has no EOS token; pass append_eos=False")
    settings = PrepareSettings(held_out_fraction, held_out_tokens, append_eos, seed)
    source_infos = [describe_source(s) for s in normalise_sources(sources)]
    out = Path(out_dir)
    existing = reusable_index(out, tok, source_infos, settings)
    if existing is not None:
        logger.info("reusing the token shards in %s (same tokenizer, sources and settings)", out)
        return existing

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = max(len(tok), max(tok.get_vocab().values()) + 1)
    index = ShardIndex(
        dtype=token_dtype(vocab_size).name,
        tokenizer_name=tok.name_or_path,
        tokenizer_hash=tokenizer_hash(tok),
        tokenizer_ids_hash=tokenizer_ids_hash(tok),
        vocab_size=vocab_size,
        eos_id=tok.eos_token_id,
        settings=settings,
        splits={split: SplitInfo(file=f"{split}.bin") for split in SPLITS},
        sources=source_infos,
        directory=out,
    )
    write_shards(index, tok, progress)
    if why := index.empty_heldout():
        logger.warning(why)
    return index


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def normalise_sources(sources: StrPath | Source | Iterable[StrPath | Source]) -> list[Source]:
    items = [sources] if isinstance(sources, str | os.PathLike | Source) else list(sources)
    return [item if isinstance(item, Source) else Source(item) for item in items]


def describe_source(source: Source) -> SourceInfo:
    root = Path(source.path).resolve()
    return SourceInfo(
        name=source.name or root.name,
        path=str(root),
        licence=source.licence,
        fingerprint=source_fingerprint(root),
    )


def source_fingerprint(root: Path) -> str:
    """Changes when a file is added, removed, resized or touched (cheap: no file is read)."""
    digest = hashlib.sha256()
    for path in scan_input_files(root).accepted:
        stat = path.stat()
        relative = path.relative_to(root) if root.is_dir() else Path(path.name)
        digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def reusable_index(
    out: Path, tok: PreTrainedTokenizerBase, sources: list[SourceInfo], settings: PrepareSettings
) -> ShardIndex | None:
    if not (out / INDEX_NAME).is_file():
        return None
    try:
        index = ShardIndex.load(out)
    except (ValueError, KeyError, TypeError, OSError) as e:
        logger.warning("ignoring the unusable index in %s: %s", out, e)
        return None
    same = (
        index.settings == settings
        and [source_identity(s) for s in index.sources] == [source_identity(s) for s in sources]
        and made_with(index, tok)
    )
    return index if same else None


def source_identity(s: SourceInfo) -> tuple[str, str, str | None, str]:
    return (s.name, s.path, s.licence, s.fingerprint)


def write_shards(index: ShardIndex, tok: PreTrainedTokenizerBase, progress: bool) -> None:
    """Stream every document into temp token files; swap them in and write the index last."""
    settings = index.settings
    splitter = (
        TokenBudgetSplitter(settings.held_out_tokens)
        if settings.held_out_tokens is not None
        else FractionSplitter(settings.held_out_fraction)
    )
    dedup = Deduplicator()
    total_tokens = 0
    with SplitWriter(index) as writer, tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
        for source in index.sources:
            documents = iter_documents(source.path, deduplicator=dedup)
            duplicates_before = dedup.duplicates
            for text, tokens in tokenize_documents(documents, tok, settings.append_eos):
                source.documents += 1
                source.tokens += len(tokens)
                total_tokens += len(tokens)
                writer.write(splitter.add(document_key(text, settings.seed), tokens))
                bar.update()
                bar.set_postfix(tokens=total_tokens, refresh=False)
            source.duplicates = dedup.duplicates - duplicates_before
        writer.write(splitter.finish())
        if not any(source.documents for source in index.sources):
            raise ValueError(
                "the sources hold no text documents; accepted file types: " + ", ".join(ACCEPTED_SUFFIXES)
            )
        writer.commit()


class SplitWriter:
    """Appends documents to temp token files; commit() publishes them with the index.

    Until commit() the previous shards (if any) stay valid; leaving the `with` block without
    commit() deletes the temp files.
    """

    def __init__(self, index: ShardIndex) -> None:
        assert index.directory is not None
        self.index = index
        self.dtype = np.dtype(index.dtype)
        self.temp_paths = {
            split: index.directory / f".{info.file}.tmp" for split, info in index.splits.items()
        }
        self.files: dict[str, BinaryIO] = {}

    def __enter__(self) -> SplitWriter:
        with self.writing():
            self.files = {split: open(path, "wb") for split, path in self.temp_paths.items()}
        return self

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A full disk or a quota: say where, and that the previous shards still stand (a bare
        `[Errno 28] No space left on device` named neither the folder nor what to do)."""
        try:
            yield
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not write the token shards in {self.index.directory} ({e.strerror or e}); "
                "the shards there before, if any, are intact: free space (or choose another "
                "folder) and run again",
            ) from e

    def write(self, routed: Iterable[tuple[str, np.ndarray]]) -> None:
        for split, tokens in routed:
            with self.writing():
                self.files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
            self.index.splits[split].documents += 1
            self.index.splits[split].tokens += len(tokens)

    def commit(self) -> None:
        directory = self.index.directory
        assert directory is not None
        with self.writing():
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())  # on disk before the index says they are complete
                f.close()
            # The old index goes first: an interruption from here on leaves no index rather than
            # an index describing token files that were already replaced.
            (directory / INDEX_NAME).unlink(missing_ok=True)
            for split, path in self.temp_paths.items():
                os.replace(path, self.index.split_path(split))
            self.index.save(directory)

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # a full disk fails the flush again: still delete the temp files
                pass
        for path in self.temp_paths.values():
            path.unlink(missing_ok=True)


def tokenize_documents(
    texts: Iterator[str], tok: PreTrainedTokenizerBase, append_eos: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """(text, token ids) per document; batched because fast tokenizers encode batches in parallel."""
    eos = [tok.eos_token_id] if append_eos else []
    while batch := list(islice(texts, TOKENIZE_BATCH_DOCUMENTS)):
        # No BOS/special tokens: documents are separated by EOS in the packed stream.
        encoded = tok(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for text, ids in zip(batch, encoded["input_ids"], strict=True):
            yield text, np.asarray(ids + eos, dtype=np.int64)
