"""`radlads convert` data-parallel on CPU (gloo, FSDP2, sharded DCP checkpoints), steps 1 and 2:
2 processes land where 1 process does at the same global batch, and a run killed right after a
mid-step checkpoint resumes on another number of processes (2 -> 1, 1 -> 2) to the same place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from radlads.convert.pipeline import export_checkpoint
from tiny_models import make_teacher_folder, write_corpus

SRC = str(Path(__file__).resolve().parents[1] / "src")
STOP_AFTER_CHECKPOINT = str(Path(__file__).with_name("stop_after_checkpoint.py"))
GLOBAL_BATCH = 4  # sequences per update, split over the processes


def convert(
    inputs, out: Path, procs: int, checkpoint_every: str = "1k", killed: bool = False, extra: tuple = ()
) -> None:
    """Steps 0-2 (step 1: 2k tokens, step 2: 4k) in `procs` processes. `killed`: every process dies
    right after the first mid-step checkpoint, which `checkpoint_every` places in step 1 or 2."""
    teacher, data = inputs
    args = ["convert", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--step1-tokens", "2k",
            "--step2-tokens", "4k", "--step3-tokens", "0", "--seq-len", "64", "--batch-size", str(GLOBAL_BATCH // procs),
            "--checkpoint-every", checkpoint_every, "--device", "cpu", "--quiet", *extra]  # fmt: skip
    if not killed:  # the user's way: radlads starts torchrun itself
        cmd = [sys.executable, "-m", "radlads", *args, "--nproc", str(procs)]
    elif procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               STOP_AFTER_CHECKPOINT, *args]  # fmt: skip
    else:
        cmd = [sys.executable, STOP_AFTER_CHECKPOINT, *args]
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def assert_same_run(out: Path, reference: Path) -> None:
    """Same held-out losses at the end of steps 1 and 2, and the same final weights."""
    ours, theirs = (json.loads((p / "radlads.json").read_text())["steps"] for p in (out, reference))
    for step in ("1", "2"):
        assert ours[step]["complete"] and ours[step]["tokens"] == theirs[step]["tokens"]
        a, b = ours[step]["heldout_end"], theirs[step]["heldout_end"]
        print(f"step {step} held-out end: {out.name} {a:.7f}, {reference.name} {b:.7f}")
        assert abs(a - b) <= 1e-4 * abs(b)
    weights, reference_weights = (load_file(p / "model.safetensors") for p in (out, reference))
    assert weights.keys() == reference_weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, reference_weights[name], rtol=1e-3, atol=1e-5, msg=name)


def killed_checkpoint(out: Path, step: int, tokens: int, procs: int) -> None:
    """The killed run left a sharded mid-step checkpoint: one shard file per process."""
    checkpoint = out / "checkpoints" / f"step{step}"
    state = json.loads((checkpoint / "trainer.json").read_text())
    assert (state["step"], state["tokens"], state["complete"]) == (step, tokens, False)
    assert len(list((checkpoint / "dcp").glob("*.distcp"))) == procs
    assert not (out / "model.safetensors").exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return make_teacher_folder(tmp), write_corpus(tmp / "corpus")


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "one-process"
    convert(inputs, out, 1)
    return out


def test_two_processes_match_one(inputs, one_process, tmp_path):
    convert(inputs, tmp_path / "two-processes", 2)
    assert_same_run(tmp_path / "two-processes", one_process)


def test_activation_checkpointing_under_fsdp_changes_nothing_but_memory(inputs, one_process, tmp_path):
    out = tmp_path / "two-processes-recomputing"
    convert(inputs, out, 2, extra=("--activation-checkpointing",))
    assert_same_run(out, one_process)


def test_two_process_checkpoint_resumes_in_one_process(inputs, one_process, tmp_path):
    out = tmp_path / "killed-2-resumed-1"
    convert(inputs, out, 2, checkpoint_every="3k", killed=True)  # dies at 3k tokens of step 2
    killed_checkpoint(out, step=2, tokens=3072, procs=2)
    exported = export_checkpoint(out / "checkpoints" / "step2", tmp_path / "exported")  # `radlads export`
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "RadladsForCausalLM" and not model.config.tie_word_embeddings
    convert(inputs, out, 1)
    assert_same_run(out, one_process)
    tokens = [
        (r["step"], r["tokens"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(tokens) == len(set(tokens))  # nothing logged twice across the restart


def test_one_process_checkpoint_resumes_in_two_processes(inputs, one_process, tmp_path):
    out = tmp_path / "killed-1-resumed-2"
    convert(inputs, out, 1, killed=True)  # dies at 1k tokens of step 1
    killed_checkpoint(out, step=1, tokens=1024, procs=1)
    convert(inputs, out, 2)
    assert_same_run(out, one_process)


def test_one_lr_group_shards_checkpoints_and_resumes_and_moves_new_parameters_less(
    inputs, one_process, tmp_path
):
    """The small-teacher preset trains step 0's new parameters at 10x the LR, in their own optimizer
    group, so the runs above hold two groups. With the scale at 1 (one group, the larger teachers'
    default), a two-process run killed in step 2 and resumed in one process ends as a one-process run
    straight through, and the new parameters move far less than with the preset."""
    one_group = ("--step2-new-lr-scale", "1")
    reference = tmp_path / "one-group-one-process"
    convert(inputs, reference, 1, extra=one_group)
    out = tmp_path / "one-group-killed-2-resumed-1"
    convert(inputs, out, 2, checkpoint_every="3k", killed=True, extra=one_group)
    killed_checkpoint(out, step=2, tokens=3072, procs=2)
    convert(inputs, out, 1, extra=one_group)
    assert_same_run(out, reference)
    decay = "model.layers.0.self_attn.w0"  # a new parameter
    moved = [
        (
            load_file(p / "model.safetensors")[decay]
            - load_file(p / "checkpoints/step1/model.safetensors")[decay]
        )
        .abs()
        .max()
        for p in (one_process, reference)
    ]
    assert moved[0] > 3 * moved[1], moved
