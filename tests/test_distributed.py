"""`torchrun -m radlads convert` on CPU (gloo, FSDP2): 2 processes agree with 1 process at the same
global batch, and a 2-process partial checkpoint resumes in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_teacher_folder, write_corpus

SRC = str(Path(__file__).resolve().parents[1] / "src")


def convert(procs: int, teacher, data, out, batch_size: int, step1_tokens: str = "8k", *extra) -> None:
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
        if procs > 1
        else [sys.executable]
    )
    cmd = [*launch, "-m", "radlads", "convert", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
           "--step1-tokens", step1_tokens, "--step2-tokens", "0", "--seq-len", "64", "--batch-size",
           str(batch_size), "--device", "cpu", "--quiet", *extra]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def heldout_end(out) -> float:
    return json.loads((Path(out) / "radlads.json").read_text())["steps"]["1"]["heldout_end"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return make_teacher_folder(tmp), write_corpus(tmp / "corpus")


def test_two_processes_match_one(inputs, tmp_path):
    teacher, data = inputs
    convert(2, teacher, data, tmp_path / "two", 2)
    convert(1, teacher, data, tmp_path / "one", 4)
    two, one = heldout_end(tmp_path / "two"), heldout_end(tmp_path / "one")
    print(f"held-out end: 2 procs {two:.6f}, 1 proc {one:.6f}, rel diff {abs(two - one) / abs(one):.2e}")
    assert abs(two - one) <= 0.02 * abs(one)
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_resume_across_world_sizes(inputs, tmp_path):
    """2 processes stop at a step-1 checkpoint at 4k tokens; 1 process resumes it to 8k and lands
    where an uninterrupted 1-process 8k run does (flat LR, so the shorter budget changes nothing)."""
    teacher, data = inputs
    config = tmp_path / "run.yaml"
    config.write_text("step1: {lr_final: null}\n")
    out, straight = tmp_path / "resumed", tmp_path / "straight"
    convert(2, teacher, data, out, 2, "4k", "--config", str(config), "--checkpoint-every", "2k")
    state_file = out / "checkpoints" / "step1" / "trainer.json"
    state = json.loads(state_file.read_text())
    assert state["tokens"] == 4096
    state_file.write_text(json.dumps({**state, "complete": False}))  # as if killed before the end
    convert(1, teacher, data, out, 4, "8k", "--config", str(config))
    convert(1, teacher, data, straight, 4, "8k", "--config", str(config))
    resumed = json.loads((out / "radlads.json").read_text())["steps"]["1"]
    assert resumed["tokens"] == 8192 and resumed["complete"]
    a, b = resumed["heldout_end"], heldout_end(straight)
    print(
        f"held-out end: resumed 2->1 procs {a:.6f}, straight 1 proc {b:.6f}, rel diff {abs(a - b) / abs(b):.2e}"
    )
    assert abs(a - b) <= 0.02 * abs(b)
