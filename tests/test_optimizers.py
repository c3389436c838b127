"""The optimizer choice: what each keeps, which one "auto" takes for the memory at hand, and how
far the smaller states move the loss from fp32 AdamW's."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from transformers import Qwen2Config

from radlads.convert import batching
from radlads.convert.plan import GB, plan
from radlads.convert.steps import ContextExtension
from radlads.convert.transfer import transfer
from radlads.train.config import ConvertConfig, StepConfig
from radlads.train.optimizers import OPTIMIZERS, STATE_BYTES
from radlads.train.trainer import Trainer
from tiny_models import TINY, make_teacher

CUDA = torch.device("cuda")  # never touched: the tests fake what the device reports


def fake_peaks(states_gb: dict[str, float]):
    return {name: (lambda b, s=s: (s + b) * GB) for name, s in states_gb.items()}


STATES = {"adamw": 100, "adamw-bf16-state": 80, "adamw-8bit": 60}


@pytest.mark.parametrize(
    "available_gb, expected",
    [
        (200, ("adamw", 32)),  # 170 GB usable: adamw fits the whole batch
        (120, ("adamw-bf16-state", 16)),  # adamw: 2 sequences (< 8 = 4096 tokens); bf16 state: 16
        (100, ("adamw-8bit", 16)),  # adamw fits nothing, bf16 state 4 sequences, 8-bit 16
        (74, ("adamw-8bit", 2)),  # under 8 sequences with every optimizer: the one fitting most
    ],
)
def test_auto_takes_the_most_precise_optimizer_that_fits_a_useful_micro_batch(available_gb, expected):
    choice = batching.choose_optimizer(32, 1, fake_peaks(STATES), available_gb * GB, seq_len=512)
    assert (choice.optimizer, choice.micro_batch) == expected
    assert choice.micro_batch * choice.grad_accum == 32 and choice.fits


def test_a_given_micro_batch_takes_the_first_optimizer_it_fits_else_the_smallest_state():
    peaks = fake_peaks(STATES)
    assert (
        batching.choose_optimizer(32, 1, peaks, 100 * GB, 512, micro_batch=4).optimizer == "adamw-bf16-state"
    )
    tight = batching.choose_optimizer(32, 1, peaks, 50 * GB, 512, micro_batch=4)
    assert (tight.optimizer, tight.grad_accum, tight.fits) == ("adamw-8bit", 8, False)
    with pytest.raises(ValueError, match="activation-checkpointing"):  # nothing fits at all
        batching.choose_optimizer(32, 1, peaks, 50 * GB, 512)


def test_plan_counts_each_optimizers_bytes_per_trained_parameter(tmp_path):
    make_teacher("qwen2").config.save_pretrained(tmp_path)
    plans = {name: plan(tmp_path, optimizer=name) for name in OPTIMIZERS}
    assert STATE_BYTES == {"adamw": 16, "adamw-bf16-state": 12, "adamw-8bit": 8 + 2 * (1 + 4 / 256)}
    base = plans["adamw"]
    for name, other in plans.items():
        saved = 16 - STATE_BYTES[name]
        trained = (base.mixer_params, base.student_params_untied, base.student_params_untied)
        for row, row_base, n in zip(_plain(other), _plain(base), trained):  # steps 1, 2, 3
            assert row_base.states_bytes - row.states_bytes == pytest.approx(n * saved)
            assert row.activation_bytes == row_base.activation_bytes


SHAPE_02B = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8)


def test_plan_recommends_for_one_gpu_what_convert_would_choose(tmp_path, monkeypatch, capsys):
    """A 0.2B-shaped config (meta models only) on a GPU where step 2's fp32 moments do not fit
    beside 8 x 256 tokens' activations, and bf16 moments do: the plan's one-GPU table gives, per
    step, the micro-batch, accumulation and optimizer that convert's own sizing takes on it."""
    from radlads.cli.main import main

    Qwen2Config(**{**TINY, **SHAPE_02B}).save_pretrained(tmp_path)
    step2 = StepConfig(tokens=0, lr=0.0, seq_len=256)
    peak = {
        n: batching.peak_estimator(tmp_path, "rad-rwkv7", 2, step2, 1, optimizer=n)(8) for n in OPTIMIZERS
    }
    usable = (peak["adamw"] + peak["adamw-bf16-state"]) / 2 / batching.USABLE_FRACTION
    gpu_gb = (usable + batching.CUDA_CONTEXT_BYTES) / GB
    argv = ["plan", "--teacher", str(tmp_path), "--gpu-memory-gb", str(gpu_gb), "--seq-len", "256"]

    def one_gpu_rows(*flags: str) -> dict[int, list[str]]:
        assert main([*argv, "--global-batch-size", "8", *flags]) == 0
        rows = [
            line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
        ]
        one_gpu = {int(r[0]): [c.strip() for c in r] for r in rows if r[0].strip() in "123" and len(r) == 6}
        assert sorted(one_gpu) == [1, 2, 3]
        return one_gpu

    # step 3 at step 2's length: no step needs checkpointing, and step 2 takes bf16 moments
    short = one_gpu_rows("--step3-seq-len", "256")
    assert short[2][1:4] == ["8 x 256 x 1", "adamw-bf16-state", "no"]
    # step 3 at the teacher's context needs it; convert's one switch then turns it on for every
    # step, and step 2's fp32 moments fit beside its smaller activations
    full = one_gpu_rows()
    assert [row[3] for row in full.values()] == ["yes"] * 3
    assert full[2][1:3] == ["8 x 256 x 1", "adamw"]
    # convert, asked for the same global batch on a GPU of that size (what it sees once its CUDA
    # context is up), with checkpointing as the plan says, sizes every step the same way
    monkeypatch.setattr(batching, "available_bytes", lambda device: usable)
    monkeypatch.setattr(batching, "installed", lambda: OPTIMIZERS)
    for step, row in [*short.items(), *full.items()]:
        batch, seq_len, accum = (int(n) for n in row[1].split(" x "))  # step 3: the teacher's context
        cfg = StepConfig(tokens=0, lr=0.0, seq_len=seq_len, global_batch_size=batch * accum)
        options = dict(activation_checkpointing=row[3] == "yes")
        sized, _ = batching.size_step(cfg, step, CUDA, 1, tmp_path, "rad-rwkv7", **options)
        assert (sized.batch_size, sized.grad_accum, sized.optimizer) == (batch, accum, row[2]), (step, row)
    # without --global-batch-size, the preset's: this teacher's size class gives step 2 32 sequences
    assert main(argv) == 0
    step2_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | "))
    micro, _, accum = (int(n) for n in step2_row.split("|")[2].split(" x "))
    assert micro * accum == 32


def test_checkpointing_is_recommended_only_where_it_lifts_a_small_micro_batch(tmp_path):
    """Without activation checkpointing where a micro-batch of 4,096 tokens fits without it; with
    it where, without it, only a smaller one would."""
    Qwen2Config(**{**TINY, **SHAPE_02B}).save_pretrained(tmp_path)
    cfg = StepConfig(tokens=0, lr=0.0, seq_len=256, global_batch_size=32)  # 16 x 256 = 4,096 tokens

    def peak(checkpointing, name, batch):
        return batching.peak_estimator(tmp_path, "rad-rwkv7", 2, cfg, 1, checkpointing, optimizer=name)(batch)

    def settings(usable):
        ckpt, choice = batching.one_gpu_settings(
            tmp_path, "rad-rwkv7", 2, cfg, usable / batching.USABLE_FRACTION
        )
        return ckpt, choice.micro_batch, choice.optimizer

    assert settings(peak(False, "adamw", 16) * 1.001) == (False, 16, "adamw")
    usable = peak(True, "adamw", 16) * 1.001
    assert all(peak(False, name, 16) > usable for name in OPTIMIZERS)  # the case this test is about
    assert settings(usable) == (True, 16, "adamw")
    # nothing fits even one sequence: the smallest choice, marked as not fitting
    ckpt, choice = batching.one_gpu_settings(tmp_path, "rad-rwkv7", 2, cfg, 1e6)
    assert ckpt and choice.micro_batch == 1 and not choice.fits


def _plain(plan_) -> list:
    """A plan's rows without activation checkpointing: one per step."""
    return [row for row in plan_.steps if "act. ckpt" not in row.name]


def test_auto_takes_only_installed_optimizers_and_says_what_would_fit(tmp_path, monkeypatch):
    """Without torchao, "auto" keeps to torch's AdamW; where that fits nothing, the error names
    torchao's smaller states."""
    Qwen2Config(**{**TINY, "hidden_size": 1024, "intermediate_size": 4096}).save_pretrained(tmp_path)
    step2 = StepConfig(tokens=0, lr=0.0, seq_len=256, global_batch_size=8)
    peak = {
        n: batching.peak_estimator(tmp_path, "rad-rwkv7", 2, step2, 1, optimizer=n)(1) for n in OPTIMIZERS
    }
    gpu = (peak["adamw"] + peak["adamw-8bit"]) / 2 / batching.USABLE_FRACTION  # 8-bit fits, adamw not
    monkeypatch.setattr(batching, "available_bytes", lambda device: gpu)
    monkeypatch.setattr(batching, "installed", lambda: OPTIMIZERS)
    sized, _ = batching.size_step(step2, 2, CUDA, 1, tmp_path, "rad-rwkv7")
    # none fits a micro-batch of 4096 tokens: auto takes the one that fits the largest
    assert sized.optimizer == "adamw-8bit" and sized.batch_size > 1
    monkeypatch.setattr(batching, "installed", lambda: ("adamw",))
    with pytest.raises(ValueError, match=r"radlads\[torchao\]"):
        batching.size_step(step2, 2, CUDA, 1, tmp_path, "rad-rwkv7")


def _loss_curve(optimizer: str, updates: int) -> tuple[list[float], Trainer]:
    """Step 3's update on a tiny student, 4 batches of random tokens in turn, at a high LR: the
    loss falls within a few updates, so that the optimizers' differences show."""
    torch.manual_seed(0)
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    cfg = dataclasses.replace(ConvertConfig().step3, seq_len=32, batch_size=4, lr=3e-3, optimizer=optimizer)
    trainer = Trainer(
        ContextExtension(), student, cfg, None, [], None, None, torch.device("cpu"), progress=False
    )
    generator = torch.Generator().manual_seed(1)
    batches = itertools.cycle([torch.randint(0, 320, (4, 32), generator=generator) for _ in range(4)])
    # torchao compiles its update per parameter shape (minutes on 2 CPU cores): the same code, eagerly
    with torch.compiler.set_stance("force_eager"):
        return [trainer.train_step(batches, cfg.lr).item() for _ in range(updates)], trainer


def test_smaller_optimizer_states_keep_the_loss_curve_of_fp32_adamw():
    """Measured here (8 updates, LR 3e-3): bf16 moments within 3e-5 (relative) of fp32 AdamW's
    loss at every update; 8-bit moments up to 7-10% apart at single updates, 1-3.5% over the
    last 4. Bounds: 1e-3 / 1e-3 and 15% / 5%."""
    pytest.importorskip("torchao")
    updates = 8
    reference, _ = _loss_curve("adamw", updates)
    assert sum(reference[4:]) < 0.8 * sum(reference[:4])  # it learns: the comparison means something
    for name, each, end in (("adamw-bf16-state", 1e-3, 1e-3), ("adamw-8bit", 0.15, 0.05)):
        losses, trainer = _loss_curve(name, updates)
        gaps = [abs(a - b) / b for a, b in zip(losses, reference)]
        assert max(gaps) < each, (name, gaps)
        assert abs(sum(losses[4:]) - sum(reference[4:])) / sum(reference[4:]) < end, name
        moments = [s["exp_avg"] for s in trainer.optimizer.state.values() if s["exp_avg"].numel() >= 4096]
        kind = {"adamw-bf16-state": "Tensor", "adamw-8bit": "OptimState8bit"}[name]
        assert moments and all(type(m).__name__ == kind for m in moments)
        if name == "adamw-bf16-state":
            assert all(m.dtype == torch.bfloat16 for m in moments)


def test_metrics_name_the_optimizer_each_step_ran_with(tmp_path):
    from radlads.train.metrics import MetricsLog

    trainer_cfg = dataclasses.replace(ConvertConfig().step3, seq_len=16, batch_size=2, tokens=64, log_every=1)
    student = transfer(make_teacher("qwen2", num_hidden_layers=1), "rad-rwkv7").train()
    batches = [torch.randint(0, 320, (2, 16)) for _ in range(2)]

    class Loader(list):
        def state_dict(self):
            return {}

    trainer = Trainer(
        ContextExtension(),
        student,
        trainer_cfg,
        Loader(batches),
        [],
        tmp_path / "ckpt",
        MetricsLog(tmp_path),
        torch.device("cpu"),
        progress=False,
    )
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["optimizer"] == "adamw" for r in records)  # "auto" unsized: torch's AdamW


@pytest.mark.parametrize("new_lr_scale", [1.0, 10.0])
def test_weight_decay_spares_norms_biases_and_the_mixers_vector_parameters(new_lr_scale):
    """AdamW's decay pulls a weight towards 0. For a matrix that is a regulariser; for the RMSNorm
    gains, the projections' biases and the mixers' w0, a0, v0, k_k and k_a it changes what the layer
    computes (w0 towards 0 shortens every channel's memory). Only tensors of 2 or more dims decay."""
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    lr = 1e-2
    step = dict(seq_len=16, batch_size=2, lr=lr, weight_decay=0.5, new_lr_scale=new_lr_scale)
    cfg = dataclasses.replace(ConvertConfig().steps()[3], **step)
    trainer = Trainer(ContextExtension(), student, cfg, None, [], None, None, torch.device("cpu"), False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    batches = itertools.repeat(torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)))
    trainer.train_step(batches, lr)
    new = {id(p) for p in student.new_parameters()}
    for name, p in student.named_parameters():
        scale = new_lr_scale if id(p) in new else 1.0
        moved = (p.detach() - before[name]).abs().max().item()
        if p.ndim < 2:  # Adam's first step moves a weight by about its LR, and no decay adds to it
            assert moved <= 1.01 * lr * scale, name
    decays = sorted({g["weight_decay"] for g in trainer.optimizer.param_groups})
    assert decays == [0.0, 0.5]
    # With no decay asked for, the groups are those of checkpoints written before this split.
    trainer = Trainer(
        ContextExtension(),
        student,
        dataclasses.replace(cfg, weight_decay=0.0),
        None,
        [],
        None,
        None,
        torch.device("cpu"),
        False,
    )
    assert len(trainer.optimizer.param_groups) == (1 if new_lr_scale == 1 else 2)
