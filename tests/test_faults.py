"""Kill `radlads convert` anywhere, re-run it, and get what an uninterrupted run gives.

A tiny conversion (GGUF teacher import, prepare-data, steps 0-3 with mid-step checkpoints, export)
runs in a child process that dies by SIGKILL: in half the trials at a seeded random write (see
fault_injection.py), spread over every phase; in the other half after a seeded random amount of
CPU time, wherever the process then is. Each trial re-runs the same command, which must end with
the reference's weights bit for bit (CPU, one thread, same data order and optimizer state: nothing
may differ), the same metrics.jsonl less timings, and the same files: nothing partial left behind.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from safetensors.torch import load_file  # noqa: E402

import fault_injection  # noqa: E402
from radlads.convert.verify import verify  # noqa: E402
from tiny_gguf import tiny_llama, tiny_vocab, write_gguf  # noqa: E402
from tiny_models import write_corpus  # noqa: E402

EVENT_TRIALS, TIMED_TRIALS = 11, 11
TRIAL_SECONDS = 120  # one child's limit; a tiny conversion takes a few seconds
CONFIG = "\n".join(f"step{k}: {{heldout_batches: 1, log_every: 1}}" for k in (1, 2, 3))


def convert_argv(root: Path, corpus: Path, config: Path) -> list[str]:
    return [
        "convert", "--teacher", str(root / "tiny.gguf"), "--data", str(corpus), "--out", str(root / "out"),
        "--config", str(config), "--step1-tokens", "512", "--step2-tokens", "384", "--step3-tokens", "384",
        "--step3-seq-len", "128", "--seq-len", "64", "--batch-size", "2", "--checkpoint-every", "256",
        "--device", "cpu", "--quiet",
    ]  # fmt: skip


class Harness:
    def __init__(self, base: Path):
        self.base = base
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(fault_injection.PRELOAD)
        warm = self.context.Process(target=fault_injection.ready)  # so that no trial times the imports
        warm.start()
        warm.join()
        write_gguf(tiny_llama(len(tiny_vocab()[0])), base / "tiny.gguf")
        self.corpus = write_corpus(base / "corpus", documents=60)
        self.config = base / "trials.yaml"
        self.config.write_text(CONFIG + "\n")

    def trial_root(self, name: str) -> Path:
        root = self.base / name / "run"
        root.mkdir(parents=True)
        shutil.copy(self.base / "tiny.gguf", root / "tiny.gguf")
        return root

    def start(self, root: Path, kill_at: int | None = None, seed: int = 0, cpu: float | None = None):
        argv = convert_argv(root, self.corpus, self.config)
        report = root.parent / "report.json"
        process = self.context.Process(
            target=fault_injection.run, args=(argv, root, report, kill_at, seed, cpu)
        )
        process.start()
        return process, report

    def finish(self, process) -> int:
        process.join(TRIAL_SECONDS)
        if process.is_alive():
            process.kill()
            process.join(10)
        return process.exitcode

    def killed_after_cpu(self, name: str, seconds: float) -> tuple[Path, int]:
        """A run that dies after `seconds` of CPU time. The same run takes a third more or less CPU
        time with the machine's load, so one that finishes first is done again, from an empty folder,
        dying at half the time."""
        for attempt in itertools.count():
            root = self.trial_root(f"{name}.{attempt}")
            process, _ = self.start(root, cpu=seconds)
            code = self.finish(process)
            if code != 0:
                return root, code
            seconds /= 2


def files_under(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "tensorboard" not in p.parts
    }


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


def assert_weights_equal(out: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def reference(harness):
    root = harness.trial_root("reference")
    process, report = harness.start(root)
    assert harness.finish(process) == 0
    recorded = json.loads(report.read_text())
    events = [tuple(e) for e in recorded["events"]]
    out = root / "out"
    assert not [f for f in verify(out) if f.problem]
    return dict(
        cpu_seconds=recorded["cpu_seconds"],
        events=events,
        weights=load_file(out / "model.safetensors"),
        metrics=metrics(out),
        files=files_under(root),
    )


def event_kills(events: list[tuple[str, str, str]], n: int, rng: random.Random) -> list[int]:
    """`n` write numbers (1-based), taking the phases in turn so each is hit."""
    by_phase: dict[str, list[int]] = {}
    for number, (_, _, where) in enumerate(events, start=1):
        by_phase.setdefault(where, []).append(number)
    phases = sorted(by_phase)
    return [rng.choice(by_phase[phases[i % len(phases)]]) for i in range(n)]


def test_the_reference_run_writes_in_every_phase(reference):
    phases = {where for _, _, where in reference["events"]}
    assert {"gguf import", "prepare-data", "checkpoint", "training log", "export"} <= phases


def test_killed_anywhere_the_rerun_ends_as_an_uninterrupted_run(harness, reference):
    rng = random.Random(0)
    trials = [("write", n) for n in event_kills(reference["events"], EVENT_TRIALS, rng)]
    trials += [("timed", rng.uniform(0.02, 0.9) * reference["cpu_seconds"]) for _ in range(TIMED_TRIALS)]
    killed, hit = 0, {}
    for i, (how, where) in enumerate(trials):
        if how == "write":
            root = harness.trial_root(f"trial{i}")
            process, report = harness.start(root, kill_at=where, seed=i)
            code = harness.finish(process)
            hit[i] = json.loads(report.read_text())
        else:
            root, code = harness.killed_after_cpu(f"trial{i}", where)
        killed += code == -signal.SIGKILL
        out = root / "out"
        if out.is_dir() and not [f for f in verify(out) if f.problem]:
            # a folder that passes verify right after the kill must hold the finished student
            assert_weights_equal(out, reference["weights"])

        process, _ = harness.start(root)
        assert harness.finish(process) == 0, (how, where)
        assert_weights_equal(out, reference["weights"])
        assert metrics(out) == reference["metrics"], (how, where)
        assert files_under(root) == reference["files"], (how, where, hit.get(i))
        assert not [f for f in verify(out) if f.problem], (how, where)
    phases = sorted({h["phase"] for h in hit.values()})
    print(f"{killed} of {len(trials)} trials killed; writes hit in: {', '.join(phases)}")
    assert killed >= 20, f"{killed} of {len(trials)} trials killed"
    assert set(phases) >= {"gguf import", "prepare-data", "checkpoint", "training log", "export"}
