"""A conversion at a model's exact shape with random weights: the config-only teacher through
`radlads convert`, the 7B shape in the benchmarks, and the one-GPU summary of a run's metrics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale  # noqa: E402  (bench/ is scripts, not a package)
import training  # noqa: E402
from common import SHAPES, teacher_config, write_random_inputs  # noqa: E402

from radlads.cli.main import main  # noqa: E402
from radlads.convert.plan import build_meta_models, count_params  # noqa: E402
from radlads.convert.transfer import load_teacher  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    write_random_inputs(work, "tiny", train_tokens=20_000, heldout_tokens=2_048, weights=False)
    return work


def _convert_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "convert", "--teacher", str(inputs / "teacher"), "--data", str(inputs / "data"), "--out", str(out),
        "--preset", "cpu-smoke", "--step2-tokens", "0", "--step3-tokens", "0", "--quiet", *extra,
    ]  # fmt: skip


needs_torchao = pytest.mark.skipif(not importlib.util.find_spec("torchao"), reason="needs radlads[torchao]")


def test_a_config_only_teacher_needs_the_flag(inputs, tmp_path, capsys):
    assert not list((inputs / "teacher").glob("*.safetensors"))
    assert main(_convert_args(inputs, tmp_path / "run", "--step1-tokens", "512")) == 2
    assert "--random-teacher-weights" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adamw-bf16-state", marks=needs_torchao)])
def test_a_config_only_teacher_converts_with_random_weights(inputs, tmp_path, optimizer):
    out = tmp_path / "run"
    extra = ["--step1-tokens", "512", "--random-teacher-weights", "--optimizer", optimizer]
    with torch.compiler.set_stance("force_eager"):  # torchao's update, uncompiled on the CPU
        assert main(_convert_args(inputs, out, *extra)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and {r["optimizer"] for r in records} == {optimizer}
    assert json.loads((out / "radlads.json").read_text())["steps"]["1"]["optimizer"] == optimizer
    # the export links the finished step's weights instead of copying them
    assert (out / "model.safetensors").stat().st_ino == (
        out / "checkpoints/step1/model.safetensors"
    ).stat().st_ino
    # every process (and each `radlads stepK`) builds the same random teacher
    first, again = (load_teacher(inputs / "teacher", random_weights=True, seed=0) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))


@needs_torchao
def test_a_mid_step_checkpoint_resumes_only_with_its_own_optimizer(inputs, tmp_path, monkeypatch, capsys):
    """One optimizer's state does not load into another's: the resume says which to pass."""
    from radlads.train.trainer import Trainer

    save = Trainer._save

    def save_then_stop(self, state: dict) -> None:
        save(self, state)
        if not state["complete"]:
            raise KeyboardInterrupt  # as a run killed right after its first mid-step checkpoint

    out, extra = (
        tmp_path / "run",
        ["--step1-tokens", "2048", "--checkpoint-every", "512", "--random-teacher-weights"],
    )
    with torch.compiler.set_stance("force_eager"):
        monkeypatch.setattr(Trainer, "_save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            main(_convert_args(inputs, out, *extra, "--optimizer", "adamw-8bit"))
        monkeypatch.setattr(Trainer, "_save", save)
        capsys.readouterr()
        assert main(_convert_args(inputs, out, *extra, "--optimizer", "adamw")) == 2
        assert "--optimizer adamw-8bit to resume" in capsys.readouterr().err
        assert main(_convert_args(inputs, out, *extra, "--optimizer", "adamw-8bit")) == 0
    state = json.loads((out / "radlads.json").read_text())["steps"]["1"]
    assert state["complete"] and state["tokens"] == 2048 and state["optimizer"] == "adamw-8bit"


def test_the_7b_shape_is_the_published_config():
    shape = SHAPES["qwen2.5-7b"]  # read from docs/plan/qwen2.5-7b.json: Qwen2.5-7B's published config
    published = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    published |= dict(num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, family="qwen2")
    assert {k: shape[k] for k in published} == published
    teacher, _ = build_meta_models(teacher_config("qwen2.5-7b"))
    assert count_params(teacher) == 7_615_616_512  # Qwen2.5-7B's published parameter count


@needs_torchao
def test_training_benchmark_runs_each_optimizer(tmp_path):
    for optimizer in ("adamw-bf16-state", "adamw-8bit"):
        out = tmp_path / optimizer
        with torch.compiler.set_stance("force_eager"):
            training.main(
                ["--tiny", "--steps", "2", "--updates", "1", "--no-baseline", "--optimizer", optimizer]
                + ["--out", str(out)]
            )
        record = json.loads((out / "training.json").read_text())
        (row,) = record["results"]
        assert row["status"] == "ok" and row["tok_s"] > 0
        assert (
            row["optimizer"] == {"adamw-bf16-state": "AdamWBf16State", "adamw-8bit": "AdamW8bit"}[optimizer]
        )


def _fake_run(run: Path, teacher: Path) -> None:
    """A convert --out folder as the summary reads it: config.yaml and metrics.jsonl."""
    run.mkdir()
    config = {"teacher": str(teacher), "arch": "rad-rwkv7"}
    config |= {f"step{k}": {"seq_len": 512 if k < 3 else 16384} for k in (1, 2, 3)}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rates = {1: [10.0, 500.0, 900.0, 1000.0, 1100.0], 2: [5.0, 300.0, 400.0], 3: [1.0, 1.0, 200.0, 250.0]}
    lines = []
    for step, values in rates.items():
        for i, rate in enumerate(values):
            record = dict(step=step, tokens=(i + 1) * 4096, loss=1.0, tokens_per_s=rate)
            peak = [50.0 + i * (-1) ** i]  # rises and falls: the step's highest is reported
            record |= dict(micro_batch=8 // step, optimizer="adamw-8bit", max_memory_allocated_gb=peak)
            lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_summary_of_a_runs_metrics(inputs, tmp_path):
    _fake_run(tmp_path / "run", inputs / "teacher")
    out = tmp_path / "docs/bench/tiny-one-gpu.json"
    scale.main(["summary", "--run", str(tmp_path / "run"), "--out", str(out), "--gpu", "H200"])
    summary = json.loads(out.read_text())
    assert summary["gpu"] == "H200" and set(summary["steps"]) == {"1", "2", "3"}
    # medians after the first 2 windows (compilation, warm-up)
    expected_rate = {"1": 1000.0, "2": 400.0, "3": 225.0}
    for step, figures in summary["steps"].items():
        assert figures["tokens_per_s"] == expected_rate[step]
        assert figures["mfu"] == pytest.approx(expected_rate[step] * figures["flops_per_token"] / 790e12)
        seq_len = 512 if step != "3" else 16384  # as _fake_run's config.yaml gives each step
        flops = scale.flops_per_token(inputs / "teacher", "rad-rwkv7", int(step), seq_len)
        assert figures["seq_len"] == seq_len and figures["flops_per_token"] == flops > 0
        assert (figures["batch"], figures["optimizer"]) == (8 // int(step), "adamw-8bit")
        assert figures["peak_gb"] == {"1": 54.0, "2": 52.0, "3": 52.0}[step]  # the step's highest window
    hours = (100e6 / 1000 + 250e6 / 400 + 100e6 / 225) / 3600
    assert summary["protocol_gpu_hours"] == pytest.approx(hours)


def test_summary_without_every_step_has_no_protocol_cost(inputs, tmp_path):
    _fake_run(tmp_path / "run", inputs / "teacher")
    metrics = tmp_path / "run/metrics.jsonl"
    metrics.write_text(
        "".join(line + "\n" for line in metrics.read_text().splitlines() if '"step": 3' not in line)
    )
    summary = scale.summarise([tmp_path / "run"], "H200")
    assert set(summary["steps"]) == {"1", "2"} and summary["protocol_gpu_hours"] is None


def test_summary_of_one_run_per_step(inputs, tmp_path):
    """scripts/device_scale.sh runs each step in its own folder (all starting from one step 0)."""
    _fake_run(tmp_path / "all", inputs / "teacher")
    lines = (tmp_path / "all/metrics.jsonl").read_text().splitlines()
    runs = []
    for step in (3, 1, 2):
        run = tmp_path / f"step{step}"
        _fake_run(run, inputs / "teacher")
        (run / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if f'"step": {step},' in x))
        runs.append(run)
    merged = scale.summarise(runs, "H200")
    together = scale.summarise([tmp_path / "all"], "H200")
    assert list(merged["steps"]) == ["1", "2", "3"]
    assert merged["protocol_gpu_hours"] == together["protocol_gpu_hours"]
    for step, figures in merged["steps"].items():
        assert figures["run"] == str(tmp_path / f"step{step}")
        assert {**figures, "run": None} == {**together["steps"][step], "run": None}


def test_projection_carries_the_measured_mfu_to_another_teacher(inputs, tmp_path):
    """At the MFU measured on one teacher, the projection for the same teacher gives back the
    measured GPU-hours, and a larger teacher costs in proportion to its FLOPs per token."""
    _fake_run(tmp_path / "run", inputs / "teacher")
    measured = scale.summarise([tmp_path / "run"], "H200")
    config = json.loads((inputs / "teacher/config.json").read_text())
    wider = tmp_path / "wider.json"
    config |= {"hidden_size": 2 * config["hidden_size"], "intermediate_size": 2 * config["intermediate_size"]}
    config.pop("head_dim", None)  # from hidden_size and the heads
    wider.write_text(json.dumps(config))
    out = tmp_path / "projection.json"
    (tmp_path / "run.json").write_text(json.dumps(measured))
    args = ["project", "--measured", str(tmp_path / "run.json"), "--usd-per-gpu-hour", "3", "--out", str(out)]
    scale.main([*args, "--teacher", str(inputs / "teacher"), str(wider)])
    same, larger = json.loads(out.read_text())["teachers"]
    assert same["protocol_gpu_hours"] == pytest.approx(measured["protocol_gpu_hours"])
    assert same["usd"] == pytest.approx(3 * same["protocol_gpu_hours"])
    for step, hours in larger["gpu_hours"].items():
        seq_len = measured["steps"][step]["seq_len"]
        ratio = (
            scale.flops_per_token(wider, "rad-rwkv7", int(step), seq_len)
            / measured["steps"][step]["flops_per_token"]
        )
        assert ratio > 1.5 and hours == pytest.approx(same["gpu_hours"][step] * ratio)
    paper = scale.PAPER_USD / scale.PAPER_PARAMS
    assert larger["vs_paper_per_param"] == pytest.approx(larger["usd"] / larger["teacher_params"] / paper)


def test_optimizer_comparison_sets_each_runs_losses_against_the_first(tmp_path):
    """Runs of step 2 under two optimizers (as device_scale.sh's OPTIMIZERS writes them)."""
    runs = []
    for name, scale_by in (("adamw", 1.0), ("adamw-8bit", 1.02)):
        run = tmp_path / f"step2-{name}"
        run.mkdir()
        losses = [2.0, 1.5, 1.2, 1.1, 1.0]
        record = {
            "steps": {
                "0": {"step": 0},
                "2": {"optimizer": name, "heldout_start": 2.0, "heldout_end": 1.0 * scale_by},
            }
        }
        (run / "radlads.json").write_text(json.dumps(record))
        lines = [
            json.dumps({"step": 2, "loss": x * (scale_by if i >= 3 else 1.0)}) for i, x in enumerate(losses)
        ]
        (run / "metrics.jsonl").write_text(
            "\n".join([*lines, json.dumps({"step": 2, "tokens_per_s": 5.0})]) + "\n"
        )
        runs.append(run)
    out = tmp_path / "cmp.json"
    scale.main(["optimizers", "--run", *map(str, runs), "--out", str(out)])
    first, other = json.loads(out.read_text())["runs"]
    assert json.loads(out.read_text())["step"] == 2 and (first["optimizer"], other["optimizer"]) == (
        "adamw",
        "adamw-8bit",
    )
    assert first["heldout_end_vs_first"] == 0 and other["heldout_end_vs_first"] == pytest.approx(0.02)
    assert other["max_logged_diff_vs_first"] == pytest.approx(0.02)
    assert other["last4_logged_diff_vs_first"] == pytest.approx(
        0.01
    )  # two of the last four logged updates differ
