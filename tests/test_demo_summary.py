"""The demo's closing summary, from the files a run leaves (no models: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from radlads.cli.demo import GPU_RESULT, RESULTS_PAGE, summary

SUMMARY_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "smollm2-135m" / "summary.json"


def test_summary_shows_steps_perplexities_positions_samples_and_where_to_look(tmp_path):
    step = dict(tokens=6144, updates=12, wall_s=61.0, heldout_start=150.0, heldout_end=20.0)
    run = {"teacher": "/x/SmolLM2-135M-Instruct-hf", "arch": "rad-rwkv7", "steps": {"1": step, "2": step}}
    (tmp_path / "radlads.json").write_text(json.dumps(run))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    loss = {"teacher": np.full(511, 3.0), "student": np.linspace(4.0, 5.0, 511)}
    results = {
        name: {"perplexity": {"ppl": float(np.exp(v.mean())), "loss_by_position": v.tolist()}}
        for name, v in loss.items()
    }
    (eval_dir / "results.json").write_text(json.dumps(results))
    text = summary(tmp_path, eval_dir / "report.md", {"teacher": " Moses", "student": "\n\n"}, 300.0)
    assert "SmolLM2-135M-Instruct-hf -> rad-rwkv7 in 5.0 min" in text
    assert "6,144 tokens in 12 updates of 512 tokens" in text and "150 -> 20" in text
    assert "NLL @1-16" in text and "NLL @257-511" in text  # buckets end at the window's length
    teacher_row = next(line for line in text.splitlines() if line.strip().startswith("teacher"))
    assert teacher_row.split()[1:] == ["20.1", "3.000", "3.000", "3.000", "3.000"]
    assert "' Moses'" in text and "'\\n\\n'" in text  # as generated: a student's newlines stay visible
    assert str(eval_dir / "report.md") in text and RESULTS_PAGE in text


def test_gpu_result_quotes_the_results_pages_runs():
    runs = json.loads(SUMMARY_JSON.read_text())
    best = next(r for r in runs if r["best"])
    pure = max(
        (r for r in runs if r["arch"] == "rad-rwkv7"), key=lambda r: r["ppl_teacher"] / r["ppl_student"]
    )
    quoted = [f"{best['ppl_student']:.2f}", f"{best['ppl_teacher']:.2f}", f"{pure['ppl_student']:.2f}"]
    assert all(number in GPU_RESULT for number in quoted), (quoted, GPU_RESULT)
