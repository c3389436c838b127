"""scripts/results_summary.py, which makes a results page's summary.json and figures, on two of
the committed SmolLM2-135M runs copied to a temporary folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "results" / "smollm2-135m" / "runs"
SCRIPT = ROOT / "scripts" / "results_summary.py"


def summarise(results: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(results), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_summary_holds_each_evaluated_student_with_the_keys_the_results_page_promises(tmp_path):
    for name in ("rwkv7-12m", "rwkv7-12m-s512"):
        shutil.copytree(RUNS / name, tmp_path / "runs" / name)
    done = summarise(tmp_path / "runs", tmp_path / "out", "--best", "rwkv7-12m:final")
    assert done.returncode == 0, done.stderr
    entries = {e["name"]: e for e in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert set(entries) == {
        f"{n}:{label}" for n in ("rwkv7-12m", "rwkv7-12m-s512") for label in ("final", "step2")
    }
    for e in entries.values():
        assert {"arch", "tokens", "ppl_student", "ppl_teacher", "nll_gap_1024_2047", "passkey"} <= set(e)
        assert {"gpu_minutes", "best"} <= set(e)
        assert e["passkey"]["1k"][1] == 1.0  # [student, teacher]: the teacher finds every 1K key
    assert [n for n, e in entries.items() if e["best"]] == ["rwkv7-12m:final"]
    assert "3" not in entries["rwkv7-12m:step2"]["tokens"]  # scored before step 3
    assert entries["rwkv7-12m-s512:final"]["step2_seq_len"] == 512

    raw = json.loads((RUNS / "rwkv7-12m-s512" / "results-final.json").read_text())
    student, teacher = (np.asarray(raw[k]["perplexity"]["loss_by_position"]) for k in ("student", "teacher"))
    gap = student[1024:2048].mean() - teacher[1024:2048].mean()
    assert np.isclose(entries["rwkv7-12m-s512:final"]["nll_gap_1024_2047"], gap)
    assert all((tmp_path / "out" / png).stat().st_size for png in ("scaling.png", "position_loss.png"))


def test_a_position_curve_of_a_run_without_results_is_refused(tmp_path):
    shutil.copytree(RUNS / "rwkv7-12m", tmp_path / "runs" / "rwkv7-12m")
    done = summarise(tmp_path / "runs", tmp_path / "out", "--positions", "rwkv7-12m:final,rwkv7-99m:final")
    assert done.returncode == 2 and "rwkv7-99m:final" in done.stderr
