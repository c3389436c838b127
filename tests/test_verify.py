"""`radlads verify OUT` on a tiny conversion: intact, then damaged one way at a time."""

from __future__ import annotations

import json
import shutil

import pytest

from radlads.cli.main import main
from tiny_models import make_teacher_folder, write_corpus


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    teacher, corpus = make_teacher_folder(tmp), write_corpus(tmp / "corpus", documents=60)
    out = tmp / "student"
    argv = [
        "convert", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--step1-tokens", "256",
        "--step2-tokens", "128", "--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def verify(capsys, out) -> tuple[int, str]:
    code = main(["verify", str(out)])
    return code, capsys.readouterr().out


def test_an_intact_conversion_passes(converted, capsys):
    code, report = verify(capsys, converted)
    assert code == 0, report
    assert report.strip().endswith("complete and intact")
    recorded = json.loads((converted / "radlads.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(recorded)
    assert "ok: model.safetensors (sha256 as exported)" in report
    assert "ok: checkpoints/step2: model.safetensors" in report


def damaged(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "copy")


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("flip a weight byte", "corrupt: model.safetensors: its sha256 differs"),
        ("delete the tokenizer", "missing: tokenizer.json, recorded at export"),
        ("delete radlads.json", "missing: radlads.json: the export did not finish"),
        ("cut a checkpoint", "corrupt: checkpoints/step1: "),
        ("delete a checkpoint", "missing: checkpoints/step2, recorded in radlads.json"),
    ],
)
def test_each_damage_is_named(converted, tmp_path, capsys, damage, expected):
    out = damaged(converted, tmp_path)
    if damage == "flip a weight byte":
        data = bytearray((out / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (out / "model.safetensors").write_bytes(bytes(data))
    elif damage == "delete the tokenizer":
        (out / "tokenizer.json").unlink()
    elif damage == "delete radlads.json":
        (out / "radlads.json").unlink()
    elif damage == "cut a checkpoint":
        weights = out / "checkpoints" / "step1" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        shutil.rmtree(out / "checkpoints" / "step2")
    code, report = verify(capsys, out)
    assert code == 1
    assert expected in report, report
    assert "problem(s)" in report.splitlines()[-1]


def test_a_folder_that_is_not_a_conversion(tmp_path, capsys):
    code, report = verify(capsys, tmp_path)
    assert code == 1 and "missing: radlads.json" in report and "missing: config.json" in report
