"""Corrupt and hostile inputs: each ends in one line naming the problem and what to do (no
traceback), before anything trains, and nothing already written is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from radlads.cli.main import main
from radlads.data import prepare_shards
from radlads.files import LOCK_NAME, claim_folder
from radlads.train.checkpoint import find_checkpoint, is_resumable, read_trainer_state
from tiny_models import make_teacher_folder, write_corpus
from tokenizer_fixture import make_wordlevel_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    return make_teacher_folder(tmp), write_corpus(tmp / "corpus", documents=80)


def convert(teacher, data, out, *extra) -> list[str]:
    return [
        "convert", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--step1-tokens", "512",
        "--step2-tokens", "0", "--step3-tokens", "0", "--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must fail with one error line holding every `expected` piece."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"radlads {argv[0]}: error:")]
    assert len(errors) == 1, err
    for piece in expected:
        assert piece in errors[0], errors[0]
    return errors[0]


def teacher_copy(teacher, tmp_path, name="teacher"):
    return shutil.copytree(teacher, tmp_path / name)


@pytest.mark.parametrize("keep", [20, 1000, 0.5])
def test_truncated_or_garbage_gguf(tmp_path, capsys, keep):
    pytest.importorskip("gguf")
    from tiny_gguf import tiny_llama, tiny_vocab, write_gguf

    good = tmp_path / "good.gguf"
    write_gguf(tiny_llama(len(tiny_vocab()[0])), good)
    data = good.read_bytes()
    bad = tmp_path / "bad" / "teacher.gguf"
    bad.parent.mkdir()
    bad.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    refused(capsys, convert(bad, tmp_path, tmp_path / "out"), "not a readable GGUF file", "download it again")
    bad.write_bytes(b"not a model " * 100)
    refused(capsys, convert(bad, tmp_path, tmp_path / "out"), "not a readable GGUF file")
    assert sorted(p.name for p in bad.parent.iterdir()) == ["teacher.gguf"]  # no import left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_garbage_safetensors(inputs, tmp_path, capsys, damage):
    teacher = teacher_copy(inputs[0], tmp_path)
    weights = teacher / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 4096)
    refused(
        capsys,
        convert(teacher, inputs[1], tmp_path / "out"),
        "model.safetensors is not a readable safetensors",
    )


def test_pickle_weights_are_not_loaded(inputs, tmp_path, capsys):
    teacher = teacher_copy(inputs[0], tmp_path)
    torch.save(load_file(teacher / "model.safetensors"), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    refused(
        capsys, convert(teacher, inputs[1], tmp_path / "out"), "no .safetensors weights", "pytorch_model.bin"
    )


def test_config_that_lies_about_shapes(inputs, tmp_path, capsys):
    teacher = teacher_copy(inputs[0], tmp_path)
    config = json.loads((teacher / "config.json").read_text())
    config["intermediate_size"] *= 2
    (teacher / "config.json").write_text(json.dumps(config))
    refused(
        capsys,
        convert(teacher, inputs[1], tmp_path / "out"),
        "config.json does not describe its weights",
        "mlp",
    )


def test_teacher_without_tokenizer(inputs, tmp_path, capsys):
    teacher = teacher_copy(inputs[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).unlink()
    refused(
        capsys,
        convert(teacher, inputs[1], tmp_path / "out"),
        "holds no tokenizer",
        "copy the teacher's tokenizer",
    )


@pytest.mark.parametrize(
    "vocab,expected", [(100, "Token ids would not match"), (2000, "more than the teacher's")]
)
def test_shards_of_another_tokenizer(inputs, tmp_path, capsys, vocab, expected):
    teacher, corpus = inputs
    shards = tmp_path / "shards"
    prepare_shards(corpus, make_wordlevel_tokenizer(tmp_path, vocab), shards, progress=False)
    refused(capsys, convert(teacher, shards, tmp_path / "out"), expected, "radlads prepare-data")


def test_out_that_is_a_file_or_not_writable(inputs, tmp_path, capsys, monkeypatch):
    teacher, corpus = inputs
    (tmp_path / "afile").write_text("mine")
    refused(capsys, convert(teacher, corpus, tmp_path / "afile"), "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"
    refused(capsys, convert(teacher, corpus, tmp_path / "afile" / "sub"), "cannot write to --out")

    def no_write(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", no_write)
    refused(
        capsys, convert(teacher, corpus, tmp_path / "locked"), "cannot write to --out", "Permission denied"
    )


def test_a_second_run_into_a_busy_out(inputs, tmp_path, capsys):
    """Two runs into one --out would write the same checkpoints: while one holds it, another stops,
    naming it, and what the first wrote stays as it was; once the first ends the folder is free."""
    teacher, corpus = inputs
    out = tmp_path / "out"
    assert main(convert(teacher, corpus, out)) == 0
    capsys.readouterr()

    def files():
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    written = files()
    with claim_folder(out, "radlads run"):  # a run still going (in this process: flock is per open file)
        refused(
            capsys,
            convert(teacher, corpus, out),
            str(out),
            "in use by another radlads run",
            f"pid {os.getpid()}",
        )
    assert files() == written
    assert main(convert(teacher, corpus, out)) == 0


def test_softmax_layers_outside_the_teacher(inputs, tmp_path, capsys):
    """Counting layers from 1 names one past the last: an error, not a hybrid of layer 0."""
    teacher, corpus = inputs
    refused(
        capsys,
        convert(teacher, corpus, tmp_path / "out", "--softmax-layers", "1,3"),
        "softmax_layers [3] are not layers of the teacher's 3",
        "from 0 to 2",
    )
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_out_that_holds_the_teacher_or_another_model(inputs, tmp_path, capsys):
    """The export replaces a folder's weights: --out naming the teacher's folder, or a model that
    no run wrote, is refused before anything is written."""
    teacher = teacher_copy(inputs[0], tmp_path)
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    refused(capsys, convert(teacher, inputs[1], teacher), "is the teacher's folder")
    refused(capsys, convert(inputs[0], inputs[1], teacher), "holds model weights that no radlads run wrote")
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before


def test_out_inside_the_text_folder_it_reads(inputs, capsys):
    """The run's logs there would be read as corpus by the next run (and re-tokenize it each time)."""
    corpus = inputs[1]
    before = sorted(p.name for p in corpus.rglob("*"))
    refused(capsys, convert(inputs[0], corpus, corpus / "run"), "lies inside the text folder --data")
    assert sorted(p.name for p in corpus.rglob("*")) == before


@pytest.mark.parametrize(
    "text,expected",
    [
        ("step1: {tokenz: 2M}\n", "unknown step1 keys ['tokenz']"),
        ("step1: {tokens: 2M\n", "is not valid YAML"),
        ("student: [1]\n", "student must be a mapping"),
    ],
)
def test_config_file_mistakes(inputs, tmp_path, capsys, text, expected):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    refused(
        capsys,
        [*convert(*inputs, tmp_path / "out"), "--config", str(config)],
        expected,
        *([str(config)] if "YAML" in expected else []),
    )


def test_a_global_batch_with_a_micro_batch_is_kept_by_accumulation(inputs, tmp_path, capsys):
    """--batch-size 2 with --global-batch-size 8: four micro-batches an update (512 tokens of
    64 at 8 a step: one update); a global batch that is no multiple is refused."""
    out = tmp_path / "out"
    assert main([*convert(*inputs, out), "--global-batch-size", "8"]) == 0
    record = json.loads((out / "radlads.json").read_text())
    assert record["steps"]["1"]["updates"] == 1
    refused(
        capsys, [*convert(*inputs, tmp_path / "other"), "--global-batch-size", "7"], "--global-batch-size 7"
    )


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["step1", "--data", "corpus", "--out", "out"], "--teacher is required"),
        (["convert", "--teacher", "t", "--data", "corpus"], "--out is required"),
        (["convert", "--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_missing_or_impossible_flags_are_one_error_line(tmp_path, capsys, monkeypatch, argv, expected):
    """The same shape as every other bad input: `radlads COMMAND: error: ...`, exit code 2."""
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, expected)
    assert not (tmp_path / "out").exists()


def test_serve_on_a_port_that_is_none(capsys):
    """Checked before the model loads, not after it, by the socket."""
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", "anything", "--port", "70000"])
    assert stop.value.code == 2 and "70000 is not a port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--model", "anything", "--limit", "0"],  # used to score one document
        ["eval", "--model", "anything", "--max-windows", "0"],
        ["bench-generate", "--model", "anything", "--new-tokens", "-1"],
        ["generate", "--model", "anything", "--prompt", "hi", "--max-new-tokens", "0"],
    ],
)
def test_a_count_below_one_is_refused_before_any_model_loads(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "is not a count: give 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--prefix-cache-mb", "-1"], "prefix_cache_bytes must be 0 (off) or more"),  # stored nothing
        (["--api-key", ""], "api_key is empty"),  # let a bare `Authorization: Bearer` through
    ],
)
def test_serve_settings_that_cannot_work_are_refused_before_the_model_loads(flags, message, capsys):
    assert main(["serve", "--model", "anything", *flags]) == 2
    assert message in capsys.readouterr().err


def test_nan_in_the_teacher_is_found_before_training(inputs, tmp_path, capsys):
    teacher = teacher_copy(inputs[0], tmp_path)
    weights = load_file(teacher / "model.safetensors")
    name = next(n for n in weights if "mlp.up_proj" in n)
    weights[name][0, 0] = float("inf")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    refused(capsys, convert(teacher, inputs[1], out), "NaN or inf", name)
    assert not (out / "checkpoints").exists()


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(inputs, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp

    teacher, corpus = inputs
    real_save, calls = dcp.save, []

    def save_until_the_disk_fills(state, checkpoint_id, **kwargs):
        calls.append(checkpoint_id)
        if len(calls) == 1:
            return real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        (checkpoint_id / "__0_0.distcp").parent.mkdir(parents=True, exist_ok=True)
        (checkpoint_id / "__0_0.distcp").write_bytes(b"\0" * 100)  # what fitted
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", save_until_the_disk_fills)
    out = tmp_path / "out"
    argv = convert(teacher, corpus, out, "--checkpoint-every", "128", "--step1-tokens", "384")
    refused(capsys, argv, "No space left on device", "last good checkpoint is intact", "(128 tokens)")
    step1 = out / "checkpoints" / "step1"
    assert find_checkpoint(step1) == step1 and is_resumable(step1)
    assert read_trainer_state(step1)["tokens"] == 128
    assert not (out / "checkpoints" / "step1.tmp").exists()  # the space of the half one is given back
    monkeypatch.undo()
    assert main(argv) == 0  # and the run resumes from it
    assert read_trainer_state(step1)["complete"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_index_that_would_run_code_is_refused(tmp_path, capsys):
    import pickle

    from radlads.convert.transfer import transfer
    from radlads.train.checkpoint import save_resumable
    from radlads.train.distributed import Distributed
    from tiny_models import make_teacher

    student = transfer(make_teacher("qwen2", num_hidden_layers=1), "rad-rwkv7")
    optimizer = torch.optim.AdamW(student.parameters())
    checkpoint = tmp_path / "step1"
    save_resumable(checkpoint, student, optimizer, {"tokens": 1, "complete": False}, Distributed())
    export = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")]
    assert main(export) == 0  # the index DCP wrote loads
    marker = tmp_path / "ran"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    refused(capsys, export, "system, which no radlads checkpoint holds")
    assert not marker.exists()


def test_a_damaged_trainer_state_names_the_checkpoint_to_delete(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(convert(*inputs, out)) == 0
    (out / "checkpoints/step1/trainer.json").write_bytes(b"\x00garbage")
    weights = (out / "model.safetensors").read_bytes()
    refused(capsys, convert(*inputs, out), "checkpoints/step1/trainer.json is damaged", "delete")
    assert (out / "model.safetensors").read_bytes() == weights  # the export stands


def test_a_repeat_fraction_out_of_range_is_refused_before_anything_runs(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, convert(*inputs, out, "--step2-repeat-fraction", "1.5"), "repeat_fraction 1.5", "0 to 1")
    assert not out.exists()
