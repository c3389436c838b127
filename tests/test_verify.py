"""`radlads verify OUT` on a tiny conversion: intact, then damaged one way at a time; and, run as a
user runs it, naming the damage in a way that doing what it says repairs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from radlads.cli.main import main
from tiny_models import make_teacher_folder, write_corpus


@pytest.fixture(scope="module")
def convert_argv(tmp_path_factory):
    """`radlads convert` of a tiny teacher, as a function of its --out."""
    tmp = tmp_path_factory.mktemp("verify")
    teacher, corpus = make_teacher_folder(tmp), write_corpus(tmp / "corpus", documents=60)
    return lambda out: [
        "convert", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--step1-tokens", "256",
        "--step2-tokens", "128", "--step3-tokens", "0", "--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def converted(convert_argv, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "student"
    assert main(convert_argv(out)) == 0
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
        (
            "cut a checkpoint",
            "/checkpoints/step1 and re-run the same `radlads convert` command to redo that step",
        ),
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


def test_a_path_that_is_no_folder(tmp_path, capsys):
    code, report = verify(capsys, tmp_path / "nowhere")
    assert code == 1 and f"missing: {tmp_path / 'nowhere'} is not a folder" in report


def radlads(*args: str) -> subprocess.CompletedProcess:
    """The command line in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "radlads", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_command_names_each_damage_and_what_it_says_to_do_repairs_it(converted, convert_argv, tmp_path):
    out = damaged(converted, tmp_path)
    intact = radlads("verify", str(out))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.strip().endswith(f"{out}: complete and intact")

    (out / "model.safetensors").write_bytes(b"not weights")
    step1_folder = out / "checkpoints" / "step1"
    checkpoint = step1_folder / "model.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    broken = radlads("verify", str(out))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    report = broken.stdout.splitlines()
    redo_export = "re-run the same `radlads convert` command to finish or repair it"
    assert f"corrupt: model.safetensors: its sha256 differs from the export's; {redo_export}" in report
    [weights] = [line for line in report if line.startswith("corrupt: weights: ")]
    assert "model.safetensors" in weights and weights.endswith(redo_export)
    [step1] = [line for line in report if line.startswith("corrupt: checkpoints/step1: ")]
    assert step1.endswith(
        f"delete {step1_folder} and re-run the same `radlads convert` command to redo that step"
    )
    assert report[-1] == f"{out}: 3 problem(s)"

    shutil.rmtree(step1_folder)
    assert main(convert_argv(out)) == 0
    repaired = radlads("verify", str(out))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
