"""Tests for radlads.data: text reading, token shards, and the packed loader."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import normalizers
from transformers import AutoTokenizer

import radlads.data.index as index_module
import radlads.data.shards as shards_module
import radlads.data.tokenizer as tokenizer_module
from radlads.data import (
    PackedLoader,
    ShardIndex,
    Source,
    TokenizerMismatchError,
    check_tokenizer,
    iter_documents,
    prepare_shards,
)
from radlads.data.shards import token_dtype
from radlads.data.text import SPLIT_DOCUMENT_CHARS, WHOLE_FILE_MAX_CHARS, Deduplicator, list_input_files
from tokenizer_fixture import make_tiny_tokenizer, make_wordlevel_tokenizer

DOCS = [f"Document number {i}: the cat sat on mat {i * 7}.\nSecond line {i}." for i in range(60)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def read_split(index: ShardIndex, split: str) -> np.ndarray:
    return np.fromfile(index.split_path(split), dtype=index.dtype)


def split_on_eos(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wordlevel_tokenizer(tmp_path_factory.mktemp("wordtok"), 5000)


# --- text reading -----------------------------------------------------------------------------


def test_compressed_and_plain_inputs_read_the_same(tmp_path: Path) -> None:
    docs = ["first document\n", "second document\n", "third document\n"]
    write_jsonl(tmp_path / "a" / "plain.jsonl", docs[:2])
    with gzip.open(tmp_path / "a" / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[2]}) + "\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("plain text doc")
    with gzip.open(tmp_path / "b" / "two.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzip text doc")
    with lzma.open(tmp_path / "b" / "three.txt.xz", "wt", encoding="utf-8") as f:
        f.write("xz text doc")
    with lzma.open(tmp_path / "b" / "four.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "xz jsonl doc"}) + "\n")

    assert list(iter_documents(tmp_path / "a")) == [docs[2], docs[0], docs[1]]  # sorted file names
    assert list(iter_documents(tmp_path / "b")) == [
        "xz jsonl doc",
        "plain text doc",
        "xz text doc",
        "gzip text doc",
    ]


def test_jsonl_without_text_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"content": "no text here", "id": 3}\n')
    with pytest.raises(
        ValueError,
        match=r"bad\.jsonl, line 3: record has no 'text' field \(its fields: 'content', 'id'\); "
        r"radlads reads each line's document from 'text': rename the field",
    ):
        list(iter_documents(path))
    path.write_text('["a list"]\n')
    with pytest.raises(
        ValueError, match=r"line 1: record has no 'text' field \(a JSON list, not an object\)"
    ):
        list(iter_documents(path))


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.jsonl.gz", "latin1.txt"])
def test_invalid_utf8_names_its_byte_and_line(tmp_path: Path, name: str) -> None:
    """The byte named was counted from the decoder's chunk: 749 for a bad byte at 140013."""
    data = b'{"text": "x"}\n' * 10_000 + b'{"text": "caf\xe9"}\n'
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(.* at byte 140013, line 10001\); convert"):
        list(iter_documents(tmp_path))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("cut.jsonl.gz", gzip.compress(b'{"text": "a document"}\n' * 5000)[:200]),
        ("cut.txt.xz", lzma.compress(b"some text\n" * 5000)[:100]),
        ("plain.txt.gz", b"not compressed at all"),
        ("plain.jsonl.xz", b"not compressed at all"),
    ],
)
def test_damaged_compressed_file_is_named(tmp_path: Path, name: str, content: bytes) -> None:
    """A download cut short raised a bare EOFError or LZMAError (a traceback from `radlads`)."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name) + ": cannot decompress it .*again"):
        list(iter_documents(tmp_path))


def test_duplicates_removed_across_files_and_sources(tmp_path: Path, tiny_tok: Path) -> None:
    write_jsonl(tmp_path / "s1" / "a.jsonl", ["alpha", "beta", "alpha"])
    (tmp_path / "s1" / "b.txt").write_text("beta")
    write_jsonl(tmp_path / "s2" / "c.jsonl", ["gamma", "alpha"])
    assert list(iter_documents([tmp_path / "s1", tmp_path / "s2"])) == ["alpha", "beta", "gamma"]

    index = prepare_shards(
        [tmp_path / "s1", Source(tmp_path / "s2", name="second", licence="CC-BY-4.0")],
        tiny_tok,
        tmp_path / "out",
        held_out_fraction=0.0,
        progress=False,
    )
    assert [(s.name, s.licence, s.documents, s.duplicates) for s in index.sources] == [
        ("s1", None, 2, 2),
        ("second", "CC-BY-4.0", 1, 1),
    ]


def test_unknown_types_warned_and_empty_input_explained(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# not read")
    (tmp_path / "doc.txt").write_text("read me")
    with pytest.warns(UserWarning, match=r"notes\.md"):
        assert list(iter_documents(tmp_path)) == ["read me"]
    (tmp_path / "doc.txt").unlink()
    with pytest.raises(
        ValueError, match=r"1 file\(s\) of unknown type\); accepted file types: \.txt, \.jsonl"
    ):
        list(iter_documents(tmp_path))


def test_symlinked_folders_are_read_once(tmp_path: Path) -> None:
    """A corpus folder that links to data kept elsewhere: the linked files are read (rglob skipped
    them silently), and a link back to a folder already read is not followed again."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.txt").write_text("linked document")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "own.txt").write_text("own document")
    (corpus / "data").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(corpus, target_is_directory=True)
    files = list_input_files(corpus)
    assert [p.relative_to(corpus).as_posix() for p in files] == ["data/linked.txt", "own.txt"]
    assert list(iter_documents(corpus)) == ["linked document", "own document"]


def test_hidden_files_are_left_out_and_broken_links_named(tmp_path: Path) -> None:
    """Tools' own files are not corpus: macOS's "._x.txt" twins (not UTF-8: they failed the
    run), notebook checkpoints (the same text twice); a link to nothing is named, not dropped."""
    (tmp_path / "a.txt").write_text("the document")
    (tmp_path / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a.txt").write_text("the document")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.warns(UserWarning, match=r"skipping 1 link\(s\) to nothing: .*gone\.txt"):
        files = list_input_files(tmp_path)
        documents = list(iter_documents(tmp_path))
    assert [p.name for p in files] == ["a.txt"] and documents == ["the document"]


def test_large_txt_is_split_on_blank_lines(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 200 + "\n" for i in range(1200)]
    text = "\n".join(paragraphs)
    assert len(text) > WHOLE_FILE_MAX_CHARS
    (tmp_path / "book.txt").write_text(text)
    docs = list(iter_documents(tmp_path))
    assert 5 < len(docs) < 100
    assert "\n".join(docs) == text  # nothing lost or reordered


def test_large_txt_without_blank_lines_is_split_at_lines(tmp_path: Path) -> None:
    """One sentence per line and no blank line: documents still end near SPLIT_DOCUMENT_CHARS, so
    the held-out split takes its share instead of all of the file or none of it."""
    lines = [f"Sentence {i} of a corpus written one per line, " + "word " * 20 + "\n" for i in range(12_000)]
    text = "".join(lines)
    assert len(text) > WHOLE_FILE_MAX_CHARS
    (tmp_path / "lines.txt").write_text(text)
    docs = list(iter_documents(tmp_path))
    assert len(docs) > 5 and max(map(len, docs)) <= SPLIT_DOCUMENT_CHARS + len(lines[0])
    assert "".join(d if d.endswith("\n") else d + "\n" for d in docs) == text  # nothing lost or reordered


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    """Editors that write UTF-8 with a BOM: a JSONL file still parses, and a text file's first
    document is its text (so it deduplicates against the same text saved without one)."""
    (tmp_path / "a.jsonl").write_text("\ufeff" + json.dumps({"text": "Hello"}) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\ufeffHello world.\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("Hello world.\n", encoding="utf-8")
    assert list(iter_documents(tmp_path, deduplicator=Deduplicator())) == ["Hello", "Hello world.\n"]


# --- shards -----------------------------------------------------------------------------------


def test_round_trip_tokens_equal_tokenizer_plus_eos(tmp_path: Path, tiny_tok: Path) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS)
    index = prepare_shards(
        tmp_path / "src", tiny_tok, tmp_path / "out", held_out_fraction=0.0, progress=False
    )
    tok = AutoTokenizer.from_pretrained(tiny_tok)
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    assert read_split(index, "train").tolist() == [t for ids in expected for t in ids]
    assert index.splits["train"].documents == len(DOCS)
    assert index.splits["heldout"].tokens == 0
    assert index == ShardIndex.load(tmp_path / "out")
    assert index.eos_id == tok.eos_token_id and index.tokenizer_name == str(tiny_tok)


def test_dtype_follows_vocab_size(tmp_path: Path, tiny_tok: Path) -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    big_tok = make_wordlevel_tokenizer(tmp_path, 70000)
    write_jsonl(tmp_path / "src" / "d.jsonl", ["w69997 w1 w65536", "w2"])
    big = prepare_shards(tmp_path / "src", big_tok, tmp_path / "big", held_out_fraction=0.0, progress=False)
    assert big.dtype == "uint32"
    assert read_split(big, "train").tolist() == [69997, 1, 65536, 69999, 2, 69999]
    small = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "small", progress=False)
    assert small.dtype == "uint16"


def test_an_empty_held_out_split_says_why_and_what_to_do(tmp_path: Path, tiny_tok: Path, caplog) -> None:
    """One book as one .txt is one document, held out whole or not at all: mostly not, and the
    run then has no held-out loss; the loader's message used to say 'add text'."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "book.txt").write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(400)))
    with caplog.at_level("WARNING", logger="radlads"):
        index = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "a", seed=2, progress=False)
    assert index.splits["heldout"].tokens == 0
    assert "held-out split is empty: none of the corpus's 1 document(s)" in caplog.text
    with pytest.raises(ValueError, match="give more, smaller documents"):
        PackedLoader(tmp_path / "a", 8, 1, split="heldout")
    caplog.clear()
    with caplog.at_level("WARNING", logger="radlads"):  # none asked for: nothing to say
        prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "b", held_out_fraction=0.0, progress=False)
    assert "held-out split is empty" not in caplog.text


def test_held_out_is_disjoint_from_train_and_seeded(tmp_path: Path, tiny_tok: Path) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS)
    index = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "a", held_out_fraction=0.3, progress=False)
    train = split_on_eos(read_split(index, "train"), index.eos_id)
    held = split_on_eos(read_split(index, "heldout"), index.eos_id)
    assert train and held
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(DOCS) == index.splits["train"].documents + len(held)
    again = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "b", held_out_fraction=0.3, progress=False)
    other = prepare_shards(
        tmp_path / "src", tiny_tok, tmp_path / "c", held_out_fraction=0.3, seed=1, progress=False
    )
    assert read_split(again, "heldout").tolist() == read_split(index, "heldout").tolist()
    assert read_split(other, "heldout").tolist() != read_split(index, "heldout").tolist()


def test_held_out_token_budget_does_not_depend_on_document_order(tmp_path: Path, tiny_tok: Path) -> None:
    write_jsonl(tmp_path / "fwd" / "docs.jsonl", DOCS)
    write_jsonl(tmp_path / "rev" / "docs.jsonl", DOCS[::-1])
    held = []
    for name in ("fwd", "rev"):
        index = prepare_shards(
            tmp_path / name, tiny_tok, tmp_path / f"out-{name}", held_out_tokens=150, progress=False
        )
        assert 0 < index.splits["heldout"].tokens <= 150
        assert index.splits["train"].tokens + index.splits["heldout"].tokens == index.sources[0].tokens
        held.append(set(split_on_eos(read_split(index, "heldout"), index.eos_id)))
    assert held[0] == held[1]


def test_mismatched_tokenizer_refused(tmp_path: Path, tiny_tok: Path, word_tok: Path) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:3])
    index = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    check_tokenizer(index, tiny_tok)
    check_tokenizer(index, AutoTokenizer.from_pretrained(tiny_tok))
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizer(index, word_tok)
    message = str(err.value)
    assert str(tiny_tok) in message and str(word_tok) in message and "radlads prepare-data" in message
    assert isinstance(err.value, ValueError)


def test_shards_outlive_a_new_serialisation_of_their_tokenizer(
    tmp_path: Path, tiny_tok: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizers release that writes the same pipeline differently (here: one more field) keeps
    the shards usable and reused; the same vocabulary in another pipeline (lower-casing first) is
    refused, and so is any change where the index does not record what the tokenizer does."""
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:3])
    index = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    written = tokenizer_module.tokenizer_hash

    def new_release(tok):  # the same pipeline, its JSON written with one more field
        spec = {"old": written(tok), "added_in_a_new_release": None}
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    monkeypatch.setattr(tokenizer_module, "tokenizer_hash", new_release)
    assert new_release(AutoTokenizer.from_pretrained(tiny_tok)) != index.tokenizer_hash
    check_tokenizer(index, tiny_tok)
    monkeypatch.setattr(shards_module, "write_shards", must_not_tokenize)
    assert prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False) == index

    lower = AutoTokenizer.from_pretrained(tiny_tok)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lower.get_vocab() == AutoTokenizer.from_pretrained(tiny_tok).get_vocab()
    with pytest.raises(TokenizerMismatchError):
        check_tokenizer(index, lower)
    index.tokenizer_ids_hash = None  # an index written before radlads recorded it
    with pytest.raises(TokenizerMismatchError):
        check_tokenizer(index, tiny_tok)


def must_not_tokenize(*args: object, **kwargs: object) -> None:
    raise AssertionError("re-tokenized although the index was reusable")


def test_existing_index_is_reused_until_sources_change(
    tmp_path: Path, tiny_tok: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:5])
    first = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)

    with monkeypatch.context() as m:
        m.setattr(shards_module, "tokenize_documents", must_not_tokenize)
        assert prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False) == first
    write_jsonl(tmp_path / "src" / "more.jsonl", DOCS[5:7])
    second = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    assert second.sources[0].documents == 7


@pytest.mark.parametrize("rebuild", [False, True])
def test_crash_while_writing_index_leaves_no_index(
    tmp_path: Path, tiny_tok: Path, monkeypatch: pytest.MonkeyPatch, rebuild: bool
) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:5])
    if rebuild:  # an old index must not survive to describe the new token files
        prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
        write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS)

    real_dumps = json.dumps

    def crash_at_the_index(data: object, *args: object, **kwargs: object) -> str:
        if isinstance(data, dict) and "splits" in data:
            raise KeyboardInterrupt
        return real_dumps(data, *args, **kwargs)

    monkeypatch.setattr(index_module.json, "dumps", crash_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["heldout.bin", "train.bin"]
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        ShardIndex.load(tmp_path / "out")


def test_crash_while_tokenizing_keeps_previous_shards(
    tmp_path: Path, tiny_tok: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:5])
    previous = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    train_before = read_split(previous, "train").tolist()
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS)  # changed sources force a rebuild

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module.SplitWriter, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    survived = ShardIndex.load(tmp_path / "out")
    assert survived == previous and read_split(survived, "train").tolist() == train_before
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_full_disk_while_tokenizing_names_the_folder_and_cleans_up(
    tmp_path: Path, tiny_tok: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC came out as a bare `[Errno 28] No space left on device`, and the close in cleanup
    failed the same way, leaving the temp files to fill the disk."""
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS[:5])
    previous = prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    write_jsonl(tmp_path / "src" / "docs.jsonl", DOCS * 40)  # changed sources force a rebuild

    class FullDisk(io.FileIO):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        shards_module, "open", lambda path, mode: io.BufferedWriter(FullDisk(path, mode)), raising=False
    )
    with pytest.raises(
        OSError, match=r"could not write the token shards in .*out \(No space left on device\).*free space"
    ):
        prepare_shards(tmp_path / "src", tiny_tok, tmp_path / "out", progress=False)
    assert ShardIndex.load(tmp_path / "out") == previous
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


# --- loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, word_tok: Path) -> Path:
    """Train tokens 0, 1, ..., 2996 then EOS (4999): every window is distinct."""
    root = tmp_path_factory.mktemp("shards")
    words = [f"w{i}" for i in range(2997)]
    eval_docs = [" ".join(words[i : i + 10]) for i in range(0, 1000, 10)]
    write_jsonl(root / "train" / "doc.jsonl", [" ".join(words)])
    write_jsonl(root / "eval" / "docs.jsonl", eval_docs)
    prepare_shards(root / "train", word_tok, root / "out", held_out_fraction=0.0, progress=False)
    prepare_shards(root / "eval", word_tok, root / "eval-out", held_out_fraction=0.5, progress=False)
    return root


def take(loader: PackedLoader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_are_long_windows_covering_each_epoch_once(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir / "out", seq_len=100, batch_size=7, seed=3)
    assert loader.num_windows == 29
    batches = take(loader, 9)  # 63 windows: two epochs and a bit, batches straddle epochs
    assert all(b.dtype == torch.int64 and b.shape == (7, 100) for b in batches)
    rows = torch.cat(batches)
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(63, 99, dtype=torch.int64))
    window_ids = (rows[:, 0] // 100).tolist()
    first, second = window_ids[:29], window_ids[29:58]
    assert sorted(first) == sorted(second) == list(range(29))
    assert first != second and first != list(range(29))
    assert loader.state_dict()["epoch"] == 2


@settings(max_examples=30, deadline=None)
@given(
    consumed=st.integers(0, 12),
    seq_len=st.integers(1, 300),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32),
)
def test_resumed_loader_continues_exactly(
    shard_dir: Path, consumed: int, seq_len: int, batch_size: int, seed: int
) -> None:
    reference = PackedLoader(shard_dir / "out", seq_len, batch_size, seed=seed)
    stream = iter(reference)
    for _ in range(consumed):
        next(stream)
    state = json.loads(json.dumps(reference.state_dict()))
    resumed = PackedLoader(shard_dir / "out", seq_len, batch_size, seed=12345)
    resumed.load_state_dict(state)
    for expected, got in zip([next(stream) for _ in range(4)], take(resumed, 4), strict=True):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ranks_partition_the_single_process_batches(shard_dir: Path, split: str) -> None:
    out = shard_dir / ("out" if split == "train" else "eval-out")
    world, per_rank, n = 3, 2, 5
    single = take(PackedLoader(out, 8, per_rank * world, split=split, seed=1), n)
    ranks = [
        take(PackedLoader(out, 8, per_rank, split=split, seed=1, rank=r, world_size=world), n)
        for r in range(3)
    ]
    for step in range(n):
        interleaved = torch.stack([ranks[r][step] for r in range(world)], dim=1).reshape(-1, 8)
        assert torch.equal(interleaved, single[step])


def test_state_from_single_process_resumes_on_several_ranks(shard_dir: Path) -> None:
    single = PackedLoader(shard_dir / "out", 50, 4, seed=2)
    take(single, 3)
    state = single.state_dict()
    expected = take(single, 2)
    ranks = [PackedLoader(shard_dir / "out", 50, 2, seed=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    got = [take(loader, 2) for loader in ranks]
    for step in range(2):
        assert torch.equal(torch.stack([got[0][step], got[1][step]], dim=1).reshape(-1, 50), expected[step])


def test_heldout_is_one_fixed_order_pass(shard_dir: Path) -> None:
    index = ShardIndex.load(shard_dir / "eval-out")
    loader = PackedLoader(shard_dir / "eval-out", seq_len=4, batch_size=3, split="heldout")
    first, second = list(loader), list(loader)
    n_batches = index.splits["heldout"].tokens // 4 // 3
    assert len(first) == n_batches > 0
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    stream = torch.from_numpy(read_split(index, "heldout").astype(np.int64))
    assert torch.equal(torch.cat(first).reshape(-1), stream[: n_batches * 12])


def test_too_short_shard_says_how_many_tokens(shard_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"has 2998 tokens, but one window of seq_len=5000 needs 5000"):
        PackedLoader(shard_dir / "out", seq_len=5000, batch_size=1)
    with pytest.raises(ValueError, match=r"'heldout' split .* has 0 tokens"):
        PackedLoader(shard_dir / "out", seq_len=4, batch_size=1, split="heldout")


def test_state_for_other_seq_len_rejected(shard_dir: Path) -> None:
    state = PackedLoader(shard_dir / "out", 10, 2).state_dict()
    with pytest.raises(ValueError, match="seq_len=10"):
        PackedLoader(shard_dir / "out", 11, 2).load_state_dict(state)


def repeated_span(row: torch.Tensor, window: torch.Tensor) -> tuple[int, int]:
    """(start, length) of the span `row` shows twice, given that its window counts up by one:
    the row follows the window up to the span's end, then jumps back to the span's start."""
    end = int(torch.nonzero(row[1:] - row[:-1] != 1)[0]) + 1
    start = int(row[end] - window[0])
    length = end - start
    assert torch.equal(row, torch.cat([window[:end], window[start:end], window[end : len(window) - length]]))
    return start, length


@pytest.mark.parametrize("seq_len", [100, 99])
def test_repeated_windows_show_a_span_again_right_after_itself(shard_dir: Path, seq_len: int) -> None:
    out = shard_dir / "out"
    plain = torch.cat(take(PackedLoader(out, seq_len, 7, seed=3), 9))  # two epochs and a bit
    loader = PackedLoader(out, seq_len, 7, seed=3, repeat_fraction=0.5)
    rows = torch.cat(take(loader, 9))
    spans: dict[int, set] = {}
    for row, window in zip(rows, plain, strict=True):
        span = None if torch.equal(row, window) else repeated_span(row, window)
        if span:
            assert seq_len // 8 <= span[1] <= seq_len // 2
        spans.setdefault(int(window[0]) // seq_len, set()).add(span)
    assert all(len(seen) == 1 for seen in spans.values())  # the same span every epoch
    repeated = [seen.pop() for seen in spans.values() if seen != {None}]
    assert 0.25 < len(repeated) / len(spans) < 0.75
    assert len({length for _, length in repeated}) > 3  # at many distances
    # a resumed loader and the ranks of a sharded run repeat the same spans
    state = loader.state_dict()
    expected = take(loader, 2)
    resumed = PackedLoader(out, seq_len, 7, repeat_fraction=0.5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, take(resumed, 2), strict=True))
    ranks = [PackedLoader(out, seq_len, 7, seed=3, repeat_fraction=0.5, rank=r, world_size=2) for r in (0, 1)]
    single = PackedLoader(out, seq_len, 14, seed=3, repeat_fraction=0.5)
    interleaved = torch.stack([next(iter(r)) for r in ranks], dim=1).reshape(-1, seq_len)
    assert torch.equal(interleaved, next(iter(single)))


def test_windows_too_short_to_repeat_stay_as_they_are(shard_dir: Path) -> None:
    plain = take(PackedLoader(shard_dir / "out", 1, 4, seed=3), 3)
    asked = take(PackedLoader(shard_dir / "out", 1, 4, seed=3, repeat_fraction=1.0), 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, asked, strict=True))


def test_heldout_windows_are_never_repeated(shard_dir: Path) -> None:
    plain = list(PackedLoader(shard_dir / "eval-out", 4, 3, split="heldout"))
    asked = list(PackedLoader(shard_dir / "eval-out", 4, 3, split="heldout", repeat_fraction=1.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, asked, strict=True))
    with pytest.raises(ValueError, match="repeat_fraction must be in"):
        PackedLoader(shard_dir / "out", 10, 2, repeat_fraction=1.5)


def test_prepare_data_help_names_real_sources() -> None:
    """The help's example named a source 'python', which prepare-data refused as unknown."""
    import argparse
    import re as re_module

    from radlads.cli.main import build_parser
    from radlads.data.sources import SOURCES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    source = next(a for a in sub.choices["prepare-data"]._actions if a.dest == "source")
    examples = re_module.search(r"e\.g\. ([\w\- ]+)\)", source.help).group(1).split()
    assert examples and all(name in SOURCES for name in examples)
