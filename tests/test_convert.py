"""The protocol end to end on CPU: `radlads convert` on a tiny Qwen2 teacher and a tiny corpus."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from radlads.cli.main import main
from radlads.train.checkpoint import find_checkpoint, read_trainer_state
from tiny_models import make_teacher_folder, write_corpus


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    return make_teacher_folder(tmp), write_corpus(tmp / "corpus")


def convert_args(teacher, corpus, out, *extra):
    return [
        "convert", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out),
        "--step1-tokens", "120k", "--step2-tokens", "40k", "--step3-tokens", "0", "--step1-lr", "3e-3",
        "--seq-len", "256", "--batch-size", "2", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def converted(workspace, tmp_path_factory):
    teacher, corpus = workspace
    out = tmp_path_factory.mktemp("run") / "student"
    assert main(convert_args(teacher, corpus, out)) == 0
    return out


def test_convert_writes_an_hf_folder_that_loads_and_generates(converted, workspace):
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert type(model).__name__ == "RadladsForCausalLM"
    assert not model.config.tie_word_embeddings  # untied from step 2 on
    ids = tokenizer("The cat sat", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_step1_loss_falls_5x_and_step2_kl_falls(converted):
    summary = json.loads((converted / "radlads.json").read_text())
    s1, s2 = summary["steps"]["1"], summary["steps"]["2"]
    assert s1["heldout_start"] / s1["heldout_end"] >= 5, s1
    assert s2["heldout_end"] < s2["heldout_start"], s2
    assert s1["tokens"] >= 120_000 and s2["tokens"] >= 40_000
    assert len(summary["steps"]["0"]["layer_cosines"]) == 3
    assert s1["hardware"] == s2["hardware"] == "1 x cpu"  # where each step's wall_s was measured


def test_metrics_jsonl_has_step_tokens_and_loss(converted):
    records = [json.loads(line) for line in (converted / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records} == {1, 2}
    assert all({"step", "tokens", "loss"} <= set(r) for r in records)
    tokens = [r["tokens"] for r in records if r["step"] == 1]
    assert tokens == sorted(tokens)
    assert any((converted / "tensorboard").iterdir())


def test_rerun_skips_finished_steps(converted, workspace, capsys):
    teacher, corpus = workspace
    before = (converted / "metrics.jsonl").read_text()
    assert main(convert_args(teacher, corpus, converted)) == 0
    assert (converted / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("command", ["step0", "prepare-data"])
def test_quiet_prints_no_progress_bars(workspace, tmp_path, command):
    """--quiet silences transformers' bars too (loading and writing weights), not only ours."""
    teacher, corpus = workspace
    out = tmp_path / "s"
    args = [command, "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--quiet"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "radlads", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not re.search(r"\[\d\d:\d\d", done.stderr), done.stderr[-3000:]  # a tqdm bar's "[00:01<"


def test_single_steps_run_alone_and_in_order(workspace, tmp_path):
    teacher, corpus = workspace
    out = tmp_path / "stepwise"
    args = convert_args(teacher, corpus, out)[1:]
    assert main(["step1", *args]) == 2  # no step 0 yet: a clear error, nothing written
    assert main(["step0", *args]) == 0
    assert (out / "config.json").is_file() and read_trainer_state(out / "checkpoints/step0")["complete"]
    # step 2 may follow step 0 directly (skipping alignment); on CPU the switch changes nothing
    assert main(["step2", *args, "--keep-kernel-intermediates"]) == 0
    assert read_trainer_state(out / "checkpoints/step2")["complete"]
    assert yaml.safe_load((out / "config.yaml").read_text())["keep_kernel_intermediates"] is True


def test_step2_repeat_fraction_shows_its_training_windows_twice(workspace, tmp_path, monkeypatch):
    import radlads.convert.pipeline as pipeline

    seen = []

    class Recorded(pipeline.PackedLoader):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append((self.split, batch))
                yield batch

    monkeypatch.setattr(pipeline, "PackedLoader", Recorded)
    teacher, corpus = workspace
    out = tmp_path / "repeated"
    args = [*convert_args(teacher, corpus, out)[1:], "--step2-tokens", "2k", "--step2-repeat-fraction", "1"]
    assert main(["step0", *args]) == 0 and main(["step2", *args]) == 0

    def shows_a_span_twice(row):  # 16 tokens seen again later in the row
        grams = {tuple(row[i : i + 16].tolist()) for i in range(len(row) - 15)}
        return len(grams) < len(row) - 15

    train = [row for split, batch in seen if split == "train" for row in batch]
    assert train and all(shows_a_span_twice(row) for row in train)
    assert not any(shows_a_span_twice(row) for split, batch in seen if split == "heldout" for row in batch)
    assert yaml.safe_load((out / "config.yaml").read_text())["step2"]["repeat_fraction"] == 1.0


def test_bad_input_is_refused_without_losing_finished_work(converted, workspace, tmp_path, capsys):
    teacher, _ = workspace
    weights = (converted / "model.safetensors").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    index = (converted / "data" / "index.json").read_text()
    config = (converted / "config.yaml").read_text()
    args = convert_args(teacher, empty, converted, "--step3-tokens", "5k", "--step3-seq-len", "512")
    assert main(args) == 2  # step 3 is new work and needs text: the empty folder is refused
    assert "accept" in capsys.readouterr().err.lower()
    assert (converted / "config.1.yaml").read_text() == config  # the run's record is kept
    assert (converted / "model.safetensors").read_bytes() == weights
    assert (converted / "data" / "index.json").read_text() == index
    assert read_trainer_state(converted / "checkpoints/step2")["complete"]
    assert (
        main(["convert", "--teacher", str(tmp_path / "nope"), "--data", "x", "--out", str(tmp_path / "o")])
        == 2
    )
    assert (
        main(["export", "--checkpoint", str(converted / "checkpoints/step9"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "not a radlads checkpoint" in capsys.readouterr().err


def test_export_writes_a_loadable_student(converted, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(converted / "checkpoints/step2"), "--out", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = AutoModelForCausalLM.from_pretrained(converted)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)


def test_killed_run_resumes_to_the_same_weights(workspace, tmp_path):
    teacher, corpus = workspace
    extra = ["--step1-tokens", "60k", "--step2-tokens", "0", "--checkpoint-every", "10k"]
    reference = tmp_path / "reference"
    assert main(convert_args(teacher, corpus, reference, *extra)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "radlads.cli.main", *convert_args(teacher, corpus, killed, *extra)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while find_checkpoint(killed / "checkpoints/step1") is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_trainer_state(find_checkpoint(killed / "checkpoints/step1"))
    assert not state["complete"] and 0 < state["tokens"] < 60_000

    assert main(convert_args(teacher, corpus, killed, *extra)) == 0
    a = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in records]
    assert len(tokens) == len(set(tokens))  # nothing logged twice across the restart


def test_yaml_config_and_token_suffixes(tmp_path):
    from radlads.train.config import ConvertConfig, parse_tokens

    assert parse_tokens("200k") == 200_000 and parse_tokens("1.5M") == 1_500_000 and parse_tokens(0) == 0
    with pytest.raises(ValueError, match="200 apples"):
        parse_tokens("200 apples")
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher: t\narch: rad-rwkv6\nstep1:\n  tokens: 2M\n  lr: 0.002\nstudent:\n  softmax_layers: [-1]\n"
    )
    cfg = ConvertConfig.from_yaml(path)
    assert cfg.step1.tokens == 2_000_000 and cfg.step1.lr == 0.002 and cfg.step1.lr_final == 1e-5
    assert cfg.step2.lr == 1e-5 and cfg.step3.seq_len == 16384 and cfg.arch == "rad-rwkv6"
    path.write_text("teacher: t\nstep4: {}\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        ConvertConfig.from_yaml(path)
    # YAML 1.1 reads a number without a dot as a string: it must still be a number
    path.write_text("step1: {lr: 1e-3, lr_final: 1e-5, betas: [9e-1, 0.95]}\nheld_out_fraction: 5e-2\n")
    cfg = ConvertConfig.from_yaml(path)
    assert (cfg.step1.lr, cfg.step1.lr_final, cfg.step1.betas, cfg.held_out_fraction) == (
        1e-3,
        1e-5,
        (0.9, 0.95),
        0.05,
    )
    path.write_text("step2: {lr: fast}\n")
    with pytest.raises(ValueError, match="lr 'fast' is not a number"):
        ConvertConfig.from_yaml(path)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    workspace, tmp_path, monkeypatch, capsys
):
    from radlads.convert.steps import AttentionAlignment

    teacher, corpus = workspace
    real_loss, calls = AttentionAlignment.loss, []

    def loss_that_diverges(self, student, batch):
        calls.append(1)
        loss = real_loss(self, student, batch)
        return loss * float("nan") if len(calls) > 30 else loss

    monkeypatch.setattr(AttentionAlignment, "loss", loss_that_diverges)
    out = tmp_path / "diverged"
    args = convert_args(
        teacher, corpus, out, "--step1-tokens", "40k", "--step2-tokens", "0", "--checkpoint-every", "5k"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err and "lower the learning rate" in err
    state = read_trainer_state(find_checkpoint(out / "checkpoints/step1"))
    assert not state["complete"] and state["tokens"] <= 30 * 512
    assert read_trainer_state(out / "checkpoints/step0")["complete"]


def test_a_resume_takes_the_commands_lr_scale_or_says_why_it_cannot(workspace, tmp_path, caplog, capsys):
    """A run stopped mid-step and resumed with another --step1-new-lr-scale: the loaded optimizer
    state must not bring the old scale back (the record would say the new one); where the new
    scale groups the parameters differently (1 against anything else), an error names it, as it
    does for weight decay switched on."""
    teacher, corpus = workspace
    out = tmp_path / "run"
    extra = ["--step1-tokens", "40k", "--step2-tokens", "0", "--checkpoint-every", "10k"]
    stopper = str(Path(__file__).with_name("stop_after_checkpoint.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, stopper, *convert_args(teacher, corpus, out, *extra, "--step1-new-lr-scale", "3")]
    subprocess.run(
        cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
    )
    assert not read_trainer_state(find_checkpoint(out / "checkpoints/step1"))["complete"]

    assert main(convert_args(teacher, corpus, out, *extra, "--step1-new-lr-scale", "1")) == 2
    error = capsys.readouterr().err
    assert "trained at 3.0x the LR, but this run asks for 1.0x" in error and "new_lr_scale to 3.0" in error
    decay = tmp_path / "decay.yaml"  # weight decay splits the groups (optimizers.param_groups)
    decay.write_text("step1: {weight_decay: 0.1}\n")
    args = convert_args(teacher, corpus, out, *extra, "--step1-new-lr-scale", "3", "--config", str(decay))
    assert main(args) == 2
    assert "state of a step run with no weight decay" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="radlads"):
        assert main(convert_args(teacher, corpus, out, *extra, "--step1-new-lr-scale", "10")) == 0
    assert "resuming with lr_scale 10.0 (was 3.0)" in caplog.text


def test_the_same_teacher_written_another_way_resumes(workspace, tmp_path, monkeypatch):
    """A trailing slash, ./ or an absolute path name the same teacher: the run resumes (here: it
    finds every step done) instead of refusing "another teacher"."""
    teacher, corpus = workspace
    monkeypatch.chdir(teacher.parent)
    out = tmp_path / "run"
    extra = ["--step1-tokens", "2k", "--step2-tokens", "0"]
    assert main(convert_args(teacher.name, corpus, out, *extra)) == 0
    for spelled in (f"{teacher.name}/", f"./{teacher.name}", str(teacher.resolve())):
        assert main(convert_args(spelled, corpus, out, *extra)) == 0


def test_heldout_loss_of_a_compiled_student_reuses_the_training_graphs():
    """With compiled layers, held-out scoring runs the graphs training compiled (train mode,
    autograd on), in micro-batches: eval mode or no_grad would compile every layer again in each
    step. The loss is the one the eval-mode path gives."""
    import dataclasses
    import itertools

    from torch._dynamo.utils import counters

    from radlads.convert.steps import ContextExtension
    from radlads.convert.transfer import transfer
    from radlads.train.config import ConvertConfig
    from radlads.train.trainer import Trainer
    from tiny_models import make_teacher

    torch.manual_seed(0)
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    torch.compiler.reset()
    for layer in student.model.layers:  # as compile_layers does, with a backend that compiles in seconds
        layer.compile(backend="aot_eager")
        layer.self_attn.compile(backend="aot_eager")
    cfg = dataclasses.replace(ConvertConfig().steps()[3], seq_len=16, batch_size=2, lr=1e-4)
    heldout = [torch.randint(0, student.config.vocab_size, (4, 16))]  # two micro-batches
    trainer = Trainer(
        ContextExtension(), student, cfg, None, heldout, None, None, torch.device("cpu"), False, compiled=True
    )
    trainer.train_step(itertools.repeat(torch.randint(0, student.config.vocab_size, (2, 16))), cfg.lr)
    graphs = counters["stats"]["unique_graphs"]
    through_training = trainer.heldout_loss()
    assert counters["stats"]["unique_graphs"] == graphs
    trainer.compiled = False
    assert trainer.heldout_loss() == pytest.approx(through_training, rel=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # what the training graphs spare


def test_new_lr_scale_moves_the_new_parameters_that_much_faster():
    """Adam's first update moves every parameter with a gradient by about its LR: the parameters
    step 0 created by new_lr_scale x LR, those copied from the teacher by LR."""
    import dataclasses
    import itertools

    from radlads.convert.steps import ContextExtension
    from radlads.convert.transfer import transfer
    from radlads.train.config import ConvertConfig
    from radlads.train.trainer import Trainer
    from tiny_models import make_teacher

    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    lr = 1e-4
    cfg = dataclasses.replace(ConvertConfig().steps()[3], seq_len=16, batch_size=2, lr=lr, new_lr_scale=10)
    trainer = Trainer(
        ContextExtension(), student, cfg, None, [], None, None, torch.device("cpu"), progress=False
    )
    new = {id(p) for p in student.new_parameters()}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    batches = itertools.repeat(
        torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    )
    trainer.train_step(batches, lr)
    moved = {"new": [], "copied": []}
    for n, p in student.named_parameters():
        step = (p.detach() - before[n]).abs().max().item()
        if step > 0:  # parameters without gradient (e.g. LoRA ups behind a zero down) stay put
            moved["new" if id(p) in new else "copied"].append(step)
    assert moved["new"] and moved["copied"]
    assert max(moved["copied"]) < 1.5 * lr
    assert 5 * lr < max(moved["new"]) < 15 * lr
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [lr, 10 * lr]


@pytest.mark.parametrize("bad", ["loss", "gradient"])
@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_update_changes_no_weight_nor_optimizer_state(fused, bad):
    """Trainer.train_step skips an update whose loss or gradient is not finite: fused AdamW
    (convert's) on the device, without reading the loss first; any other optimizer (the benchmark's
    baseline) on the host."""
    import dataclasses
    import itertools

    from radlads.convert.steps import ContextExtension
    from radlads.convert.transfer import transfer
    from radlads.train.config import ConvertConfig
    from radlads.train.trainer import Trainer
    from tiny_models import make_teacher

    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    cfg = dataclasses.replace(ConvertConfig().steps()[3], seq_len=16, batch_size=2, lr=1e-2)
    trainer = Trainer(
        ContextExtension(), student, cfg, None, [], None, None, torch.device("cpu"), progress=False
    )
    if not fused:
        trainer.optimizer = torch.optim.AdamW(trainer.params, lr=cfg.lr)
    batches = itertools.repeat(torch.randint(0, student.config.vocab_size, (2, 16)))
    assert math.isfinite(trainer.train_step(batches, cfg.lr).item())  # state to keep
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    steps = [s["step"].clone() for s in trainer.optimizer.state.values()]

    def params_sum():
        return sum(p.sum() for p in trainer.params)

    if bad == "loss":
        trainer.loss = lambda batch: torch.tensor(float("nan")) * params_sum()
    else:  # sqrt's gradient at 0 is inf, times 0: NaN gradients under a loss of 1
        trainer.loss = lambda batch: torch.sqrt(params_sum() * 0) + 1
    assert math.isnan(trainer.train_step(batches, cfg.lr).item()) is (bad == "loss")
    for k, v in student.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(torch.equal(s["step"], t) for s, t in zip(trainer.optimizer.state.values(), steps))


def test_prepare_data_then_convert_from_shards(workspace, tmp_path, capsys, caplog):
    teacher, corpus = workspace
    shards = tmp_path / "shards"
    assert main(["prepare-data", "--teacher", str(teacher), "--data", str(corpus), "--out", str(shards)]) == 0
    assert "train:" in capsys.readouterr().out and (shards / "index.json").is_file()
    args = convert_args(teacher, shards, tmp_path / "out", "--step1-tokens", "5k", "--step2-tokens", "0")
    with caplog.at_level(logging.INFO, logger="radlads"):
        assert main(args) == 0
    assert not (tmp_path / "out" / "data").exists()  # the given shards are used, not copied
    # each step's end says how long it took and its held-out losses, to 4 significant digits
    done = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    assert len(done) == 1 and re.fullmatch(
        r"step 1 done in \d+\.\d min: loss \S+ -> \S+ \(held-out [\d.]+ -> [\d.]+\)", done[0]
    )
    assert main(["prepare-data", "--teacher", str(teacher), "--out", str(tmp_path / "none")]) == 2


def test_step3_trains_without_the_teacher_in_memory(workspace, tmp_path, monkeypatch):
    from radlads.train.trainer import Trainer

    teacher, corpus = workspace
    run, teacher_ref, alive_in_step3 = Trainer.run, [], []

    def spy(trainer):
        if trainer.objective.step == 1:
            teacher_ref.append(weakref.ref(trainer.objective.teacher))
        if trainer.objective.step == 3:
            gc.collect()
            alive_in_step3.append(teacher_ref[0]() is not None)
        return run(trainer)

    monkeypatch.setattr(Trainer, "run", spy)
    extra = ["--step1-tokens", "1k", "--step2-tokens", "0", "--step3-tokens", "1k", "--step3-seq-len", "256"]
    assert main(convert_args(teacher, corpus, tmp_path / "out", *extra)) == 0
    assert teacher_ref and alive_in_step3 == [False]


def test_generate_eval_and_bench_generate_commands(converted, workspace, tmp_path, capsys, monkeypatch):
    teacher, _ = workspace
    loaded, real_load = [], AutoModelForCausalLM.from_pretrained

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    for flags in ([], ["--compile"]):
        args = ["generate", "--model", str(converted), "--prompt", "The cat", "--max-new-tokens", "6", *flags]
        assert main(args) == 0
        assert capsys.readouterr().out.strip()
    # the command turns compiling off unless asked (the saved config has it on)
    assert [(m.config.compile_prefill, m.config.compile_decode) for m in loaded] == [
        (False, False),
        (True, True),
    ]
    loaded.clear()
    report_dir = tmp_path / "report"
    args = ["eval", "--model", str(converted), "--teacher", str(teacher), "--seq-len", "128",
            "--max-windows", "4", "--limit", "4", "--copy", "0,32", "--out", str(report_dir), "--quiet"]  # fmt: skip
    assert main(args) == 0
    args = ["eval", "--model", str(converted), "--seq-len", "64", "--max-windows", "1", "--compile", "--quiet",
            "--out", str(tmp_path / "report-compiled")]  # fmt: skip
    assert main(args) == 0
    # scoring turns compiling off unless asked; the teacher (plain HF) has no such switch
    student_configs = [m.config for m in loaded if hasattr(m.config, "compile_prefill")]
    assert [(c.compile_prefill, c.compile_decode) for c in student_configs] == [(False, False), (True, True)]
    monkeypatch.undo()
    capsys.readouterr()
    report = (report_dir / "report.md").read_text()
    assert "perplexity/ppl" in report and "student/teacher" in report
    assert "copy/nll@32" in report and "copy/gain@0" in report
    assert (report_dir / "position_loss.png").stat().st_size > 0
    args = ["bench-generate", "--model", str(converted), "--teacher", str(teacher), "--contexts", "32,64",
            "--new-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.count("student") == 2 and table.count("teacher") == 2


class RepeatingLoader:
    """What Trainer needs of a loader: one batch over and over."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return itertools.repeat(self.batch)

    def state_dict(self):
        return {}


class CountingObjective:
    """Update k's loss is k (NaN at `nan_at`), with a gradient of 0 for every parameter."""

    step, name = 3, "counting"

    def __init__(self, nan_at: int | None = None):
        self.calls, self.nan_at = 0, nan_at
        self.clock = 0.0  # a clock for the trainer on which each update takes one second

    def perf_counter(self) -> float:
        return self.clock

    def trainable(self, student):
        return list(student.parameters())

    def loss(self, student, batch):
        self.calls += 1
        self.clock += 1.0
        value = float("nan") if self.calls == self.nan_at else float(self.calls)
        return value + 0 * sum(p.sum() for p in student.parameters())


def counting_trainer(tmp_path, monkeypatch, objective, updates: int, heldout_batches: int):
    """A Trainer of a one-layer student for `updates` updates of 2 x 8 tokens, logging each, whose
    clock is `objective`'s (CountingObjective: a second per loss), with `heldout_batches` batches
    of held-out text."""
    import dataclasses

    from radlads.convert.transfer import transfer
    from radlads.train.config import ConvertConfig
    from radlads.train.metrics import MetricsLog
    from radlads.train.trainer import Trainer
    from tiny_models import make_teacher

    student = transfer(make_teacher("qwen2", num_hidden_layers=1), "rad-rwkv7").train()
    cfg = dataclasses.replace(
        ConvertConfig().steps()[3], seq_len=8, batch_size=2, tokens=updates * 16, log_every=1
    )
    batch = torch.randint(0, student.config.vocab_size, (2, 8))
    monkeypatch.setattr("radlads.train.trainer.time", objective)
    heldout = [batch] * heldout_batches
    return Trainer(
        objective,
        student,
        cfg,
        RepeatingLoader(batch),
        heldout,
        tmp_path / "ckpt",
        MetricsLog(tmp_path),
        torch.device("cpu"),
        False,
    )


@pytest.mark.parametrize("updates,nan_at", [(5, None), (1, None), (5, 3)])
def test_run_reads_each_loss_after_queuing_the_next_and_loses_none(tmp_path, monkeypatch, updates, nan_at):
    """Trainer.run reads update k's loss only once update k + 1 is queued (no GPU idle between
    updates): every loss still reaches the log in order with its update's throughput (the last
    update's too, read right after the one before it; a one-update run too), first and last are
    right, and a NaN stops the run naming the tokens of the update that produced it."""
    from radlads.train.trainer import TrainingDiverged

    objective = CountingObjective(nan_at)
    trainer = counting_trainer(tmp_path, monkeypatch, objective, updates, heldout_batches=0)
    if nan_at is not None:
        with pytest.raises(TrainingDiverged, match=f"nan after {nan_at * 16} tokens"):
            trainer.run()
        assert objective.calls == nan_at + 1  # the next update was queued before the read
        return
    result = trainer.run()
    records = [json.loads(line) for line in trainer.metrics.path.read_text().splitlines()]
    assert [(r["tokens"], r["loss"]) for r in records] == [(16 * k, float(k)) for k in range(1, updates + 1)]
    assert [r["tokens_per_s"] for r in records] == [16.0] * updates  # 16 tokens a second each
    assert [r["elapsed_s"] for r in records] == [float(k) for k in range(1, updates + 1)]
    assert (result.first_loss, result.last_loss, result.updates) == (1.0, float(updates), updates)


def test_a_steps_wall_time_counts_its_heldout_scoring(tmp_path, monkeypatch):
    """wall_s (the GPU minutes of the results pages) is the whole step: with compiled layers the
    held-out scoring before the first update is where the training graphs compile. Each loss,
    held-out or not, takes one second of the objective's clock: 2 updates and 3 held-out batches
    before and after them make 8 seconds."""
    trainer = counting_trainer(tmp_path, monkeypatch, CountingObjective(), updates=2, heldout_batches=3)
    result = trainer.run()
    assert result.wall_s == 8.0
    records = [json.loads(line) for line in trainer.metrics.path.read_text().splitlines()]
    assert [r["elapsed_s"] for r in records] == [4.0, 5.0]  # the updates after 3 s of held-out scoring


def test_metrics_record_the_allocators_peak_beside_the_tensors_peak(tmp_path, monkeypatch):
    """On CUDA each record holds both peaks per rank: what tensors took and what the allocator
    held for them, the difference the micro-batch choice's margin has to cover."""
    from radlads.train.metrics import MetricsLog
    from radlads.train.trainer import Trainer

    peaks = {"max_memory_allocated": 72.4e9, "max_memory_reserved": 75.1e9}
    for name, value in peaks.items():
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    trainer = Trainer.__new__(Trainer)  # _log needs only its device, processes and log
    trainer.device, trainer.metrics = torch.device("cuda", 0), MetricsLog(tmp_path)
    trainer.dist = type("OneProcess", (), {"is_main": True, "gather": staticmethod(lambda v: [v])})()
    trainer._log({"step": 2})
    record = json.loads(trainer.metrics.path.read_text())
    assert record == {"step": 2, "max_memory_allocated_gb": [72.4], "max_memory_reserved_gb": [75.1]}
