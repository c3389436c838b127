"""A corpus of real English text built from Debian packages.

The paper distils on web text (DCLM). No hub can be reached here, so the corpus comes from what a
package registry serves: manuals, dictionaries, quotations and a public-domain Bible. Each source
is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a temporary folder (nothing
is installed), stripped of markup, split into documents, deduplicated and written as JSON lines:

    build_corpus(["python-docs", "gcide"], "corpus/")
    # corpus/python-docs.jsonl, corpus/gcide.jsonl: {"text": ...} per line
    # corpus/sources.json: package, version, licence, documents, characters, tokens per source
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from radlads.data import text_extract as tx
from radlads.files import write_json_atomic

# Characters per token of English prose under BPE vocabularies like SmolLM2's; only used when no
# tokenizer is given to count exactly.
CHARS_PER_TOKEN = 4.2
MIN_DOCUMENT_CHARS = 64


@dataclass(frozen=True)
class SourceSpec:
    package: str  # Debian package name
    files: tuple[str, ...]  # globs, relative to the unpacked package, of the files to read
    reader: Callable[[Path], Iterable[str]]  # one file -> the documents in it
    exclude: tuple[str, ...] = ()  # fnmatch patterns on those relative paths
    description: str = ""


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    version: str
    root: Path  # the unpacked package


LICENCE_MENTIONS = {
    "GPL": r"General Public License",
    "GFDL": r"Free Documentation License|\bGFDL\b",
    "BSD": r"\bBSD\b",
    "public domain": r"public domain",
    "Artistic": r"Artistic License",
    "CC": r"Creative Commons",
    "PSF": r"Python Software Foundation License|PSF License",
}

# The mdBook books in rust-doc; the rest of it is generated API pages, thousands of them for intrinsics.
RUST_BOOKS = (
    "book",
    "reference",
    "rust-by-example",
    "nomicon",
    "edition-guide",
    "embedded-book",
    "rustc",
    "rustdoc",
)
SPHINX_EXCLUDES = ("*/_sources/*", "*/_static/*", "*/genindex*", "*/search.html", "*/py-modindex.html")

SOURCES: dict[str, SourceSpec] = {
    "python-docs": SourceSpec(
        package="python3.11-doc",
        files=("usr/share/doc/python3.11/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="Python 3.11 documentation: tutorial, library reference, HOWTOs",
    ),
    "linux-docs": SourceSpec(
        package="linux-doc-6.1",
        files=("usr/share/doc/linux-doc-6.1/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="Linux kernel 6.1 documentation",
    ),
    "django-docs": SourceSpec(
        package="python-django-doc",
        files=("usr/share/doc/python-django-doc/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="Django 3.2 documentation",
    ),
    "postgresql-docs": SourceSpec(
        package="postgresql-doc-15",
        files=("usr/share/doc/postgresql-doc-15/html/*.html",),
        reader=tx.html_documents,
        description="PostgreSQL 15 manual",
    ),
    "debian-handbook": SourceSpec(
        package="debian-handbook",
        files=("usr/share/doc/debian-handbook/html/en-US/*.html",),
        reader=tx.html_documents,
        description="The Debian Administrator's Handbook (English edition only)",
    ),
    "debian-reference": SourceSpec(
        package="debian-reference-en",
        files=("usr/share/debian-reference/*.en.html",),
        reader=tx.html_documents,
        description="Debian Reference",
    ),
    "debian-policy": SourceSpec(
        package="debian-policy",
        files=("usr/share/doc/debian-policy/*.txt.gz",),
        reader=tx.text_documents,
        description="Debian Policy Manual and related policies",
    ),
    "debian-developers-reference": SourceSpec(
        package="developers-reference",
        files=("usr/share/developers-reference/*.html",),
        reader=tx.html_documents,
        description="Debian Developer's Reference",
    ),
    "debian-docs": SourceSpec(
        package="doc-debian",
        files=("usr/share/doc/debian/*",),
        reader=tx.text_documents,
        description="Debian constitution, social contract, manifesto, bug tracker guides",
    ),
    "git-docs": SourceSpec(
        package="git-doc",
        files=("usr/share/doc/git-doc/**/*.html",),
        reader=tx.html_documents,
        description="Git manual pages and guides",
    ),
    "perl-docs": SourceSpec(
        package="perl-doc",
        files=("usr/share/perl/*/pod/*.pod",),
        reader=tx.pod_documents,
        description="Perl documentation: perlfaq, perltut, perlfunc and the rest",
    ),
    "gnu-standards": SourceSpec(
        package="gnu-standards",
        files=("usr/share/doc/gnu-standards/*.text.gz",),
        reader=tx.text_documents,
        description="GNU Coding Standards and Information for GNU Maintainers",
    ),
    "jargon": SourceSpec(
        package="jargon-text",
        files=("usr/share/doc/jargon-text/jargon.txt.gz",),
        reader=tx.text_documents,
        description="The Jargon File 4.4.7",
    ),
    "fortunes": SourceSpec(
        package="fortunes",
        files=("usr/share/games/fortunes/*",),
        reader=tx.fortune_documents,
        exclude=("*.dat", "*.u8"),
        description="Quotations from the fortune cookie database",
    ),
    "gcide": SourceSpec(
        package="dict-gcide",
        files=("usr/share/dictd/gcide.index",),
        reader=tx.dictd_documents,
        description="Collaborative International Dictionary of English (Webster's 1913 + WordNet)",
    ),
    "wordnet": SourceSpec(
        package="dict-wn",
        files=("usr/share/dictd/wn.index",),
        reader=tx.dictd_documents,
        description="WordNet 3.0 definitions",
    ),
    "foldoc": SourceSpec(
        package="dict-foldoc",
        files=("usr/share/dictd/foldoc.index",),
        reader=tx.dictd_documents,
        description="Free On-line Dictionary of Computing",
    ),
    "devils-dictionary": SourceSpec(
        package="dict-devil",
        files=("usr/share/dictd/devil.index",),
        reader=tx.dictd_documents,
        description="Ambrose Bierce, The Devil's Dictionary",
    ),
    "world-english-bible": SourceSpec(
        package="sword-text-web",
        files=("usr/share/sword/modules/texts/ztext/*/*.bzs",),
        reader=tx.sword_documents,
        description="World English Bible (public domain), one document per book",
    ),
    "sqlite-docs": SourceSpec(
        package="sqlite3-doc",
        files=("usr/share/doc/sqlite3/**/*.html",),
        reader=tx.html_documents,
        description="SQLite documentation and release notes",
    ),
    "nodejs-docs": SourceSpec(
        package="nodejs-doc",
        files=("usr/share/doc/nodejs/api/*.html",),
        reader=tx.html_documents,
        exclude=("*/all.html",),  # every other page concatenated
        description="Node.js 18 API documentation",
    ),
    "lilypond-docs": SourceSpec(
        package="lilypond-doc-html",
        files=("usr/share/doc/lilypond/html/Documentation/*/*.html",),
        reader=tx.html_documents,
        exclude=("*/snippets/*", "*/internals/*"),  # generated code listings and property tables
        description="LilyPond manuals: learning, notation, usage, essay, music glossary",
    ),
    "rust-books": SourceSpec(
        package="rust-doc",
        files=tuple(f"usr/share/doc/rust-doc/html/{book}/**/*.html" for book in RUST_BOOKS),
        reader=tx.html_documents,
        exclude=("*/print.html",),  # the whole book on one page
        description="The Rust Programming Language, Reference, Rust by Example, Rustonomicon and more",
    ),
    "sklearn-docs": SourceSpec(
        package="python-sklearn-doc",
        files=("usr/share/doc/python-sklearn-doc/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="scikit-learn user guide, examples and API reference",
    ),
    "pandas-docs": SourceSpec(
        package="python-pandas-doc",
        files=("usr/share/doc/python-pandas-doc/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="pandas user guide, release notes and API reference",
    ),
    "scipy-docs": SourceSpec(
        package="python-scipy-doc",
        files=("usr/share/doc/python-scipy-doc/html/**/*.html",),
        reader=tx.html_documents,
        exclude=SPHINX_EXCLUDES,
        description="SciPy tutorial and API reference",
    ),
    "erlang-docs": SourceSpec(
        package="erlang-doc",
        files=("usr/share/doc/erlang-doc/**/*.html",),
        reader=tx.html_documents,
        description="Erlang/OTP 25 documentation",
    ),
    "octave-docs": SourceSpec(
        package="octave-doc",
        files=("usr/share/doc/octave/**/*.html",),
        reader=tx.html_documents,
        description="GNU Octave manual",
    ),
}


def build_corpus(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    fetch: Callable[[str, Path], FetchedPackage] | None = None,
) -> Path:
    """Fetch, extract and write each named source; return `out_dir`.

    A document already written for an earlier source of the same call is skipped, so the order of
    `sources` decides which source keeps a shared document. sources.json keeps the records of
    sources built by earlier calls into the same folder. With a Hugging Face `tokenizer`, token
    counts are exact; without one they are estimated as characters / 4.2.
    """
    unknown = [name for name in sources if name not in SOURCES]
    if unknown:
        raise KeyError(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
    fetch = fetch or fetch_debian_package
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    summary = previous_summary(out)
    for name in sources:
        spec = SOURCES[name]
        with tempfile.TemporaryDirectory(prefix=f"radlads-{name}-") as work:
            package = fetch(spec.package, Path(work))
            documents = deduplicated(extract_documents(spec, package.root), seen)
            counts = write_jsonl(documents, out / f"{name}.jsonl", tokenizer)
            summary[name] = package_record(spec, package) | counts
        # after each source: a later one failing must not leave this one's text without its licence
        write_json_atomic(out / "sources.json", summary, indent=2)
    return out


def fetch_debian_package(package: str, work: Path) -> FetchedPackage:
    """Download a .deb (no install) and unpack it under `work`."""
    run(["apt-get", "download", package], cwd=work)
    deb = next(work.glob(f"{package}_*.deb"))
    version = run(["dpkg-deb", "--field", str(deb), "Version"]).strip()
    root = work / "root"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    return FetchedPackage(package, version, root)


def run(command: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def source_files(spec: SourceSpec, root: Path) -> list[Path]:
    found = {path for pattern in spec.files for path in root.glob(pattern) if path.is_file()}
    return sorted(
        path
        for path in found
        if not any(fnmatch.fnmatch(path.relative_to(root).as_posix(), p) for p in spec.exclude)
    )


def extract_documents(spec: SourceSpec, root: Path) -> Iterator[str]:
    files = source_files(spec, root)
    if not files:
        raise FileNotFoundError(f"{spec.package} has no files matching {spec.files}")
    for path in files:
        for document in spec.reader(path):
            if len(document) >= MIN_DOCUMENT_CHARS:
                yield document


def deduplicated(documents: Iterable[str], seen: set[str]) -> Iterator[str]:
    """Drop documents whose `dedup_key` is in `seen`, adding the new keys to it."""
    for document in documents:
        key = tx.dedup_key(document)
        if key not in seen:
            seen.add(key)
            yield document


def write_jsonl(documents: Iterable[str], path: Path, tokenizer=None) -> dict:
    """Write `{"text": ...}` lines through a temporary file; return the counts."""
    counts = {"documents": 0, "characters": 0, "tokens": 0}
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            for document in documents:
                handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
                counts["documents"] += 1
                counts["characters"] += len(document)
                counts["tokens"] += count_tokens(document, tokenizer)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    counts["tokens_counted_by"] = tokenizer.name_or_path if tokenizer is not None else "chars/4.2"
    return counts


def count_tokens(text: str, tokenizer=None) -> int:
    if tokenizer is None:
        return round(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def package_record(spec: SourceSpec, package: FetchedPackage) -> dict:
    copyright_file = package.root / "usr/share/doc" / package.name / "copyright"
    notice = tx.read_text(copyright_file) if copyright_file.is_file() else ""
    return {
        "package": package.name,
        "version": package.version,
        "registry": "debian",
        "license": licence_summary(notice),
        "copyright_notice": notice[:600],
        "description": spec.description,
    }


def licence_summary(notice: str) -> str:
    """The licence of a Debian copyright file, as short names where it gives them.

    Machine-readable (DEP-5) files, which start with `Format:`, name the licence of `Files: *`
    first, then those of bundled pieces. Free-form files only state theirs in prose, so for those
    we report which well-known licences they mention.
    """
    if notice.startswith("Format:"):
        return ", ".join(dep5_licences(notice)) or "unknown: see copyright_notice"
    mentioned = [
        name for name, pattern in LICENCE_MENTIONS.items() if re.search(pattern, notice, re.IGNORECASE)
    ]
    return "mentions " + ", ".join(mentioned) if mentioned else "unknown: see copyright_notice"


def dep5_licences(notice: str) -> list[str]:
    names = [n.strip() for n in re.findall(r"^License:[ \t]*(\S.*)$", notice, flags=re.MULTILINE)]
    main = re.search(r"^Files:[ \t]*\*[ \t]*\n(?:.+\n)*?License:[ \t]*(\S.*)$", notice, flags=re.MULTILINE)
    if main:
        names.insert(0, main.group(1).strip())
    return list(dict.fromkeys(names))


def previous_summary(out: Path) -> dict:
    """Records of sources built by an earlier call whose files are still there."""
    record = out / "sources.json"
    if not record.is_file():
        return {}
    return {
        name: entry
        for name, entry in json.loads(record.read_text()).items()
        if (out / f"{name}.jsonl").is_file()
    }
