"""Plain text out of the formats Debian ships prose in: HTML, dictd, fortune, POD and SWORD files.

Each `*_documents(path)` reader takes one file and yields the documents in it, as plain text with
paragraphs separated by blank lines. `normalise` and `dedup_key` are shared by all sources.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

# Elements whose text is page furniture or code for the browser, never prose; `note` is an OSIS
# (SWORD Bible) footnote, which would cut verses in half.
SKIPPED_TAGS = frozenset(
    {"script", "style", "nav", "header", "footer", "head", "noscript", "svg", "form", "button", "note"}
)
# Sphinx, DocBook and friends mark their sidebars and permalink anchors with these classes.
SKIPPED_CLASSES = frozenset(
    {
        "sphinxsidebar", "related", "footer", "navheader", "navfooter", "docnav", "headerlink",
        "breadcrumb", "toc",
    }
)  # fmt: skip
SKIPPED_ROLES = frozenset({"navigation", "search", "banner", "contentinfo"})
SKIPPED_IDS = frozenset({"banner", "sidebar", "navigation", "footer"})
BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "main", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "pre",
        "blockquote", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "title", "caption", "figure",
        "chapter", "verse", "lg", "l",
    }
)  # fmt: skip
VOID_TAGS = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"})

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_INLINE_SPACE = re.compile(r"(?<=\S)[ \t\u00a0\u2000-\u200a\u202f\u3000]+")
_BLANK_RUN = re.compile(r"\n{3,}")
_ANY_SPACE = re.compile(r"\s+")


def read_text(path: Path) -> str:
    """A text file's contents, gunzipped if Debian compressed it."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def normalise(text: str) -> str:
    """One space between words, no trailing spaces, at most one blank line between paragraphs.

    Leading indentation is kept: in code and verse it carries meaning.
    """
    return tidy("\n".join(_INLINE_SPACE.sub(" ", line) for line in text.split("\n")))


def tidy(text: str) -> str:
    """Unix newlines, NFC, no control characters or trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in _CONTROL.sub("", text).split("\n")]
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


def unwrap(text: str) -> str:
    """Join hard-wrapped lines into one line per paragraph."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def dedup_key(text: str) -> str:
    """Documents that differ only in case or spacing share a key."""
    return hashlib.sha1(_ANY_SPACE.sub(" ", text.casefold()).strip().encode()).hexdigest()


class _TextCollector(HTMLParser):
    """Collects visible text block by block, skipping navigation, scripts and styles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._buffer: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            self._skip_depth += tag == self._skip_tag
            return
        if tag not in VOID_TAGS and self._is_furniture(tag, dict(attrs)):
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self._flush()
        self._pre_depth += tag == "pre"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is None and tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            self._skip_depth -= tag == self._skip_tag
            if self._skip_depth == 0:
                self._skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self._flush()
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    @staticmethod
    def _is_furniture(tag: str, attrs: dict[str, str | None]) -> bool:
        classes = set((attrs.get("class") or "").split())
        return (
            tag in SKIPPED_TAGS
            or bool(classes & SKIPPED_CLASSES)
            or attrs.get("role") in SKIPPED_ROLES
            or attrs.get("id") in SKIPPED_IDS
        )

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer = []
        # Code keeps its line breaks and indentation; prose is reflowed.
        text = (
            "\n".join(line.rstrip() for line in text.split("\n"))
            if self._pre_depth
            else " ".join(text.split())
        )
        if text.strip("\n"):
            self.blocks.append(text.strip("\n"))


def html_to_text(html: str) -> str:
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    # Blocks are already reflowed, and code blocks must keep their inner spacing.
    return tidy("\n\n".join(collector.blocks).replace("\u00b6", ""))


def html_documents(path: Path) -> Iterator[str]:
    yield html_to_text(read_text(path))


def text_documents(path: Path) -> Iterator[str]:
    yield normalise(read_text(path))


def fortune_documents(path: Path) -> Iterator[str]:
    """A fortune file holds quotes separated by lines holding a single '%'."""
    for quote in re.split(r"^%\s*$", read_text(path), flags=re.MULTILINE):
        yield normalise(quote)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(encoded: str) -> int:
    """dictd indexes write offsets and lengths in base 64, most significant digit first."""
    value = 0
    for char in encoded:
        value = value * 64 + _B64.index(char)
    return value


def dictd_documents(index_path: Path) -> Iterator[str]:
    """Each headword's entry in a dictd database (`NAME.index` beside `NAME.dict[.dz]`).

    Entries are reflowed, since dictd wraps them at 70 columns, and `{cross references}` lose
    their braces. The `00-database-*` entries describe the database itself and are left out.
    """
    dictionary = _dictd_data(index_path)
    seen: set[tuple[int, int]] = set()
    for line in read_text(index_path).splitlines():
        headword, offset, length = line.rsplit("\t", 2)
        span = (dictd_number(offset), dictd_number(length))
        if headword.startswith("00-database") or span in seen:  # synonyms point at one entry
            continue
        seen.add(span)
        entry = dictionary[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")
        yield unwrap(re.sub(r"[{}]", "", entry))


def _dictd_data(index_path: Path) -> bytes:
    stem = index_path.name.removesuffix(".index")
    for name in (f"{stem}.dict.dz", f"{stem}.dict"):
        candidate = index_path.with_name(name)
        if candidate.exists():
            data = candidate.read_bytes()
            # dictzip files are gzip files with a random-access table in the header.
            return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    raise FileNotFoundError(f"no {stem}.dict(.dz) beside {index_path}")


_POD_CODE = re.compile(r"[A-Z]<(?:<+\s)?([^<>]*?)(?:\s>+)?>")


def pod_to_text(pod: str) -> str:
    """Perl POD: keep headings and paragraphs, drop directives and formatting codes."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", pod):
        if paragraph.startswith("=head") or paragraph.startswith("=item"):
            kept.append(paragraph.split(None, 1)[1] if " " in paragraph else "")
        elif not paragraph.startswith("="):
            kept.append(paragraph)
    text = "\n\n".join(kept)
    for _ in range(3):  # codes nest, e.g. L<C<open>|perlfunc/open>
        text = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], text)
    return normalise(text)


def pod_documents(path: Path) -> Iterator[str]:
    yield pod_to_text(read_text(path))


def sword_documents(index_path: Path) -> Iterator[str]:
    """Each book of a SWORD zText module (`ot.bzs` indexes zlib blocks in `ot.bzz`).

    Blocks are OSIS XML; footnotes are dropped with the other skipped tags.
    """
    index = index_path.read_bytes()
    data = index_path.with_suffix(".bzz").read_bytes()
    for start in range(0, len(index), 12):
        offset, size, _ = struct.unpack("<III", index[start : start + 12])
        yield html_to_text(zlib.decompress(data[offset : offset + size]).decode("utf-8", errors="replace"))
