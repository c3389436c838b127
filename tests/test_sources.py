"""Corpus extraction on small inline samples; the package fetch is faked, so no network."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from radlads.data import sources
from radlads.data import text_extract as tx

PAGE = """<!DOCTYPE html><html><head><title>Page title</title><style>p { color: red }</style>
<script>var tracking = "do not keep";</script></head>
<body><div class="related" role="navigation"><a href="x">previous</a> | <a href="y">next</a></div>
<nav><ul><li>Home</li><li>About</li></ul></nav>
<div class="body"><h1>Rivers<a class="headerlink" href="#r">&para;</a></h1>
<p>A river is a natural   flowing
watercourse, usually  freshwater &amp; flowing towards an ocean.</p>
<p>Rivers<br>carry sediment.</p>
<pre>def flow(x):
    return  x + 1</pre>
<div class="sphinxsidebar"><div><h3>Quick search</h3><form><input type="text"></form></div></div>
</div><footer>Copyright 2024</footer></body></html>"""


def test_html_keeps_prose_and_code_and_drops_furniture():
    text = tx.html_to_text(PAGE)
    assert text == (
        "Rivers\n\n"
        "A river is a natural flowing watercourse, usually freshwater & flowing towards an ocean.\n\n"
        "Rivers\n\ncarry sediment.\n\n"
        "def flow(x):\n    return  x + 1"
    )


def test_html_skipping_survives_nested_same_tags():
    html = '<div class="toc"><div>one</div><div>two</div></div><p>kept</p><div>also kept</div>'
    assert tx.html_to_text(html) == "kept\n\nalso kept"


def test_fortune_file_splits_on_percent_lines(tmp_path):
    path = tmp_path / "wisdom"
    path.write_text("First  quote,\n\tindented attribution\n%\nSecond quote.\n%\n%\n")
    assert list(d for d in tx.fortune_documents(path) if d) == [
        "First quote,\n\tindented attribution",
        "Second quote.",
    ]


def b64(number: int) -> str:
    digits = ""
    while True:
        digits = tx._B64[number % 64] + digits
        number //= 64
        if number == 0:
            return digits


def write_dictd(tmp_path: Path, entries: list[tuple[str, str]], aliases: dict[str, str]) -> Path:
    """A dictd database: NAME.dict.dz (gzip) plus an index of headword, offset, length."""
    body, index, spans = b"", [], {}
    for headword, entry in entries:
        data = entry.encode()
        spans[headword] = (len(body), len(data))
        body += data
    for headword in [h for h, _ in entries] + list(aliases):
        offset, length = spans[aliases.get(headword, headword)]
        index.append(f"{headword}\t{b64(offset)}\t{b64(length)}")
    (tmp_path / "tiny.dict.dz").write_bytes(gzip.compress(body))
    (tmp_path / "tiny.index").write_text("\n".join(index) + "\n")
    return tmp_path / "tiny.index"


def test_dictd_number_matches_dictd_base64():
    assert tx.dictd_number("A") == 0 and tx.dictd_number("Fz") == 5 * 64 + 51
    assert all(tx.dictd_number(b64(n)) == n for n in (0, 63, 64, 4097, 10**7))


def test_dictd_entries_are_reflowed_and_deduplicated(tmp_path):
    entries = [
        ("00-database-short", "00-database-short\n   Tiny test dictionary\n"),
        ("river", "river\n    n 1: a large natural stream of water; [syn:\n         {watercourse}]\n"),
        ("stone", "stone\n    n 1: a lump of rock\n\n    2: a unit of weight\n"),
    ]
    index = write_dictd(tmp_path, entries, aliases={"watercourse": "river"})
    assert list(tx.dictd_documents(index)) == [
        "river n 1: a large natural stream of water; [syn: watercourse]",
        "stone n 1: a lump of rock\n\n2: a unit of weight",
    ]


def test_pod_keeps_text_and_drops_directives():
    pod = (
        "=head1 NAME\n\nperlintro - a  brief introduction\n\n=over 4\n\n"
        "=item * Use L<perlfunc|perlfunc/open> and C<print>.\n\n=back\n\n=cut\n"
    )
    assert tx.pod_to_text(pod) == "NAME\n\nperlintro - a brief introduction\n\n* Use perlfunc and print."


def test_sword_books_are_decompressed_and_footnotes_dropped(tmp_path):
    books = [
        '<title type="main">Genesis</title><chapter sID="Gen.1"/><verse sID="Gen.1.1"/>In the beginning'
        '<note type="translation">Or, "heavens"</note> God created the heavens and the earth.',
        "<title>Exodus</title>Now these are the names of the sons of Israel.",
    ]
    index, data = b"", b""
    for book in books:
        block = zlib.compress(book.encode())
        index += struct.pack("<III", len(data), len(block), len(book))
        data += block
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(data)
    assert list(tx.sword_documents(tmp_path / "ot.bzs")) == [
        "Genesis\n\nIn the beginning God created the heavens and the earth.",
        "Exodus\n\nNow these are the names of the sons of Israel.",
    ]


def test_read_text_gunzips(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("caf\u00e9\r\n".encode()))
    assert tx.read_text(tmp_path / "a.txt.gz") == "caf\u00e9\r\n"


def test_normalise_collapses_spaces_but_keeps_indentation():
    assert tx.normalise("\ufeffa\u00a0 b  c \r\n\n\n\n    code  here\x00\n") == "a b c\n\n    code here"


def test_dedup_ignores_case_and_spacing():
    seen: set[str] = set()
    docs = ["Hello  World", "hello world\n", "Hello, world"]
    assert list(sources.deduplicated(docs, seen)) == ["Hello  World", "Hello, world"]
    assert list(sources.deduplicated(["HELLO WORLD"], seen)) == []


DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tiny

Files: debian/*
Copyright: 2020 Someone
License: GPL-2+

Files: *
Copyright: 2019 Upstream
License: CC-BY-SA-3.0

License: GPL-2+
 full text
"""


def test_licence_summary_puts_the_main_licence_first():
    assert sources.licence_summary(DEP5) == "CC-BY-SA-3.0, GPL-2+"
    assert sources.licence_summary("This text is in the public domain.") == "mentions public domain"
    assert sources.licence_summary("Files: *\nLicense: GPL\n") == "unknown: see copyright_notice"
    assert sources.licence_summary("All rights reserved.") == "unknown: see copyright_notice"


LONG = "word " * 20


def fake_fetch(packages: dict[str, dict[str, str]]):
    """Stands in for apt-get: each package unpacks to the given files plus a copyright file."""

    def fetch(package: str, work: Path) -> sources.FetchedPackage:
        root = work / "root"
        for relative, content in packages[package].items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(content)
        (root / f"usr/share/doc/{package}").mkdir(parents=True, exist_ok=True)
        (root / f"usr/share/doc/{package}/copyright").write_text(DEP5)
        return sources.FetchedPackage(package, "1.0-1", root)

    return fetch


@pytest.fixture
def two_sources(monkeypatch):
    monkeypatch.setitem(
        sources.SOURCES,
        "pages",
        sources.SourceSpec("pages-doc", ("html/**/*.html",), tx.html_documents, ("*/genindex*",), "pages"),
    )
    monkeypatch.setitem(
        sources.SOURCES, "quotes", sources.SourceSpec("quotes", ("fortunes/*",), tx.fortune_documents)
    )
    return fake_fetch(
        {
            "pages-doc": {
                "html/a.html": f"<p>Alpha {LONG}</p>",
                "html/sub/b.html": f"<p>Beta {LONG}</p>",
                "html/c.html": f"<p>ALPHA  {LONG}</p>",  # duplicate of a.html
                "html/genindex.html": f"<p>Index {LONG}</p>",
                "html/short.html": "<p>Too short.</p>",
            },
            "quotes": {"fortunes/q": f"Quote one {LONG}\n%\nBeta {LONG}\n%\n"},  # second is in pages
        }
    )


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_build_corpus_writes_documents_and_records(tmp_path, two_sources):
    out = sources.build_corpus(["pages", "quotes"], tmp_path / "corpus", fetch=two_sources)
    pages = [f"Alpha {LONG}".strip(), f"Beta {LONG}".strip()]
    assert read_jsonl(out / "pages.jsonl") == pages
    assert read_jsonl(out / "quotes.jsonl") == [f"Quote one {LONG}".strip()]
    record = json.loads((out / "sources.json").read_text())
    assert record["pages"] | {"copyright_notice": None} == {
        "package": "pages-doc",
        "version": "1.0-1",
        "registry": "debian",
        "license": "CC-BY-SA-3.0, GPL-2+",
        "copyright_notice": None,
        "description": "pages",
        "documents": 2,
        "characters": sum(len(page) for page in pages),
        "tokens": sum(round(len(page) / 4.2) for page in pages),
        "tokens_counted_by": "chars/4.2",
    }
    assert record["quotes"]["documents"] == 1
    assert not list(out.glob("*.partial"))


def test_build_corpus_keeps_records_of_earlier_builds(tmp_path, two_sources):
    sources.build_corpus(["pages"], tmp_path, fetch=two_sources)
    sources.build_corpus(["quotes"], tmp_path, fetch=two_sources)
    assert set(json.loads((tmp_path / "sources.json").read_text())) == {"pages", "quotes"}


def test_a_source_that_fails_keeps_the_records_of_those_before_it(tmp_path, two_sources):
    """The network goes at the second package: the first one's text stays recorded (package,
    version, licence), so the corpus never holds text whose licence nobody wrote down."""

    def second_fails(package, work):
        if package == "quotes":
            raise RuntimeError("apt-get download quotes failed (100): E: network unreachable")
        return two_sources(package, work)

    with pytest.raises(RuntimeError, match="network unreachable"):
        sources.build_corpus(["pages", "quotes"], tmp_path, fetch=second_fails)
    assert set(json.loads((tmp_path / "sources.json").read_text())) == {"pages"}
    sources.build_corpus(["quotes"], tmp_path, fetch=two_sources)
    assert set(json.loads((tmp_path / "sources.json").read_text())) == {"pages", "quotes"}


def test_build_corpus_counts_tokens_with_a_tokenizer(tmp_path, two_sources):
    class WordTokenizer:
        name_or_path = "words"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    sources.build_corpus(["quotes"], tmp_path, tokenizer=WordTokenizer(), fetch=two_sources)
    record = json.loads((tmp_path / "sources.json").read_text())["quotes"]
    assert record["tokens"] == 2 + 20 + 1 + 20 and record["tokens_counted_by"] == "words"


def test_build_corpus_rejects_unknown_sources(tmp_path):
    with pytest.raises(KeyError, match="unknown sources"):
        sources.build_corpus(["no-such-source"], tmp_path, fetch=fake_fetch({}))


def test_every_registered_source_names_a_reader_and_files():
    for name, spec in sources.SOURCES.items():
        assert spec.package and spec.files and callable(spec.reader), name
