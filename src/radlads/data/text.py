"""Read documents from .txt / .jsonl files (optionally .gz / .xz compressed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TextIO

ACCEPTED_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".txt.xz", ".jsonl.gz", ".jsonl.xz")

# A plain-text file up to this many characters is one document; a bigger one (a book, a dump)
# is cut at blank lines so that held-out selection and EOS separators stay meaningful.
WHOLE_FILE_MAX_CHARS = 1_000_000
SPLIT_DOCUMENT_CHARS = 100_000

StrPath = str | os.PathLike[str]


def accepted_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in ACCEPTED_SUFFIXES if name.endswith(s)), None)


@dataclass(frozen=True)
class InputFiles:
    accepted: list[Path]
    skipped: list[Path]  # of unknown type
    broken: list[Path]  # links to nothing


def scan_input_files(path: StrPath) -> InputFiles:
    """Files under `path` (a file or a folder, searched recursively), in sorted order."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data source {root} does not exist")
    found = sorted(walk_files(root)) if root.is_dir() else [root]
    candidates = [p for p in found if p.is_file()]
    files = InputFiles(
        accepted=[p for p in candidates if accepted_suffix(p)],
        skipped=[p for p in candidates if not accepted_suffix(p)],
        broken=[p for p in found if p.is_symlink() and not p.exists()],
    )
    if not files.accepted:
        skipped = f" ({len(files.skipped)} file(s) of unknown type)" if files.skipped else ""
        raise ValueError(
            f"no input files in {root}{skipped}; accepted file types: {', '.join(ACCEPTED_SUFFIXES)}"
        )
    return files


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, through symlinked folders too (a corpus folder often links to
    datasets kept elsewhere; Path.rglob would skip them without a word), each folder once. Hidden
    files and folders (".name") are left out: they are tools' own (macOS's "._x.txt" twins of
    every file, .ipynb_checkpoints copies, .git), not the corpus."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already read: a cycle, or the same data twice
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        yield from (Path(folder) / name for name in names if not name.startswith("."))


def list_input_files(path: StrPath) -> list[Path]:
    """Accepted files under `path`, warning about the ones of unknown type and broken links."""
    files = scan_input_files(path)
    for paths, what in ((files.skipped, "file(s) of unknown type"), (files.broken, "link(s) to nothing")):
        if paths:
            listed = ", ".join(str(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
            warnings.warn(f"skipping {len(paths)} {what}: {listed}", stacklevel=2)
    return files.accepted


def opener(path: Path):
    """open, or gzip.open / lzma.open for a compressed file, by its name."""
    name = path.name.lower()
    return gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open


def open_text(path: Path) -> TextIO:
    """UTF-8 text, without the byte-order mark that some editors write first (it would break a
    JSONL file's first line and become part of a text file's first document)."""
    return opener(path)(path, "rt", encoding="utf-8-sig")


def read_documents(path: Path) -> Iterator[str]:
    """Documents of one accepted file, as stored (empty ones included)."""
    reader = read_jsonl if ".jsonl" in accepted_suffix(path) else read_txt
    with open_text(path) as f:
        try:
            yield from reader(f, path)
        except UnicodeDecodeError as e:
            # e.start counts from the chunk being decoded, not from the start of the file.
            offset, line = first_invalid_utf8(path)
            raise ValueError(
                f"{path}: not valid UTF-8 ({e.reason} at byte {offset}, line {line}); convert it to "
                "UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`) or remove it"
            ) from e
        except (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error) as e:
            # A download cut short, or a file named .gz/.xz that is not: Python names neither the file
            # nor the cause (a cut .gz raises EOFError, which `radlads` would show as a traceback).
            raise ValueError(
                f"{path}: cannot decompress it ({e}): the file is cut short, damaged or not "
                f"{path.suffix[1:]}-compressed; download or compress it again"
            ) from e


def first_invalid_utf8(path: Path) -> tuple[int, int]:
    """(byte offset, line number) of the first byte of `path`, decompressed, that is not UTF-8."""
    offset = lineno = 0
    with opener(path)(path, "rb") as f:
        # A newline byte is never part of a multi-byte character, so lines decode on their own.
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start, lineno
            offset += len(line)
    return offset, lineno


def read_jsonl(f: TextIO, path: Path) -> Iterator[str]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or "text" not in record:
            found = (
                f"its fields: {', '.join(map(repr, list(record)[:10]))}"
                if isinstance(record, dict)
                else f"a JSON {type(record).__name__}, not an object"
            )
            raise ValueError(
                f"{path}, line {lineno}: record has no 'text' field ({found}); radlads reads each "
                "line's document from 'text': rename the field holding it"
            )
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {lineno}: 'text' is a {type(text).__name__}, not a string")
        yield text


def read_txt(f: TextIO, path: Path) -> Iterator[str]:
    head = f.read(WHOLE_FILE_MAX_CHARS + 1)
    if len(head) <= WHOLE_FILE_MAX_CHARS:
        yield head
        return
    # Finish the line the head cut through, then stream the rest line by line.
    lines = chain(io.StringIO(head + f.readline()), f)
    yield from split_paragraphs(lines, SPLIT_DOCUMENT_CHARS)


def split_paragraphs(lines: Iterable[str], target_chars: int) -> Iterator[str]:
    """Group blank-line-separated paragraphs into documents of about `target_chars`. A paragraph
    longer than that (a file of one sentence per line, with no blank line) ends at the first line
    past it: one document of a whole file would go to the held-out split or to training whole."""
    document: list[str] = []
    size = 0
    paragraph: list[str] = []
    paragraph_size = 0
    for line in chain(lines, [""]):  # the sentinel flushes the last paragraph
        if line.strip():
            paragraph.append(line)
            paragraph_size += len(line)
            if paragraph_size < target_chars:
                continue
        if not paragraph:
            continue
        text = "".join(paragraph)
        paragraph, paragraph_size = [], 0
        if document and size + len(text) > target_chars:
            yield "\n".join(document)
            document, size = [], 0
        document.append(text)
        size += len(text)
    if document:
        yield "\n".join(document)


class Deduplicator:
    """Remembers a 16-byte digest per document seen (memory grows with the document count)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0

    def is_new(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(digest)
        return True


def iter_documents(
    paths: StrPath | Iterable[StrPath], *, deduplicator: Deduplicator | None = None
) -> Iterator[str]:
    """Non-empty, exact-deduplicated documents from files or folders, in a deterministic order.

    Pass a shared `deduplicator` to remove duplicates across several calls.
    """
    roots = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    dedup = deduplicator if deduplicator is not None else Deduplicator()
    for root in roots:
        for path in list_input_files(root):
            for text in read_documents(path):
                if text.strip() and dedup.is_new(text):
                    yield text
