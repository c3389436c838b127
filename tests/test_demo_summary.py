"""`radlads demo`: its closing summary from the files a run leaves (no models: fast), and the whole
command on a tiny GGUF teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radlads.cli.demo import GPU_RESULT, RESULTS_PAGE, summary

SUMMARY_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "smollm2-135m" / "summary.json"


def test_summary_shows_steps_perplexities_positions_samples_and_where_to_look(tmp_path):
    step = dict(tokens=6144, updates=12, wall_s=61.0, heldout_start=150.0, heldout_end=20.0)
    run = {"teacher": "/x/SmolLM2-135M-Instruct-hf", "arch": "rad-rwkv7", "steps": {"1": step, "2": step}}
    (tmp_path / "radlads.json").write_text(json.dumps(run))
    shape = {"num_hidden_layers": 30, "softmax_layers": [17, 18], "softmax_window": 8192}
    (tmp_path / "config.json").write_text(json.dumps(shape))
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
    assert (
        "student: layers 17, 18 kept as softmax attention, over the last 8,192 tokens; the other 28" in text
    )
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


def test_demo_runs_end_to_end_on_a_tiny_gguf_teacher(tmp_path, monkeypatch, capsys):
    """`radlads demo` as a user runs it (GGUF import, convert, eval, samples, summary), with the
    bundled SmolLM2 swapped for a tiny GGUF teacher and the CPU budgets cut to seconds."""
    pytest.importorskip("gguf")
    from radlads.cli import demo
    from radlads.cli.main import main
    from tiny_gguf import tiny_llama, tiny_vocab, write_gguf

    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(len(tiny_vocab()[0])), gguf_file)
    monkeypatch.setattr(demo, "default_teacher_gguf", lambda: gguf_file)
    step = dict(tokens="512", seq_len=64, batch_size=2, heldout_batches=1, log_every=1)
    monkeypatch.setitem(demo.BUDGETS, "cpu", dict(step1=dict(step, lr=3e-3), step2=dict(step, lr=3e-4)))
    monkeypatch.setitem(demo.EVAL, "cpu", dict(seq_len=64, max_windows=2, batch_size=2))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "tiny-hf -> rad-rwkv7" in text and "step 2 distillation (KL): 512 tokens" in text
    assert "student: all 2 layers time mixers" in text  # too few layers for the preset's hybrid
    table = text[text.index("held-out text") :].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["teacher", "student"]
    assert "greedy continuation" in text and RESULTS_PAGE in text
    assert (out / "eval" / "report.md").is_file() and (out / "eval" / "position_loss.png").is_file()
    assert (out / "radlads.json").is_file() and (out / "model.safetensors").is_file()
