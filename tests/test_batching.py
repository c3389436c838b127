"""convert's micro-batch: the largest that the memory plan fits, the global batch kept by
accumulation, and an update that runs out of memory run again smaller with nothing lost."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from radlads.convert import batching
from radlads.convert.plan import GB, plan
from radlads.convert.steps import ContextExtension
from radlads.convert.transfer import transfer
from radlads.train.config import ConvertConfig
from radlads.train.trainer import Trainer
from tiny_models import make_teacher

CUDA = torch.device("cuda")  # never touched: the tests fake what the device reports


def test_choice_is_the_largest_divisor_under_the_usable_memory():
    def peak(batch):
        return (10 + batch) * GB

    # 85% of 100 GB usable: 10 + b <= 85, so b <= 75; the largest divisor of 128 under it is 64.
    choice = batching.choose(128, 1, peak, 100 * GB)
    assert (choice.micro_batch, choice.grad_accum) == (64, 2)
    assert choice.estimated_peak_gb == pytest.approx(74.0)
    # two processes: 64 each, all fit
    assert batching.choose(128, 2, peak, 100 * GB).micro_batch == 64
    assert batching.choose(128, 1, peak, 1000 * GB).micro_batch == 128
    assert batching.choose(96, 1, peak, 20 * GB).micro_batch == 6  # 16 GB usable: 6 divides 96


def test_too_little_memory_for_one_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="activation-checkpointing.*radlads plan"):
        batching.choose(8, 1, lambda b: 30 * GB * b, 20 * GB)


def test_cpu_takes_a_small_divisor_of_the_global_batch():
    assert batching.choose(128, 1, None, None).micro_batch == 8
    assert batching.choose(12, 1, None, None) == batching.BatchChoice(6, 2, None, None)


def test_estimator_is_the_plans_estimate_at_every_micro_batch(tmp_path):
    make_teacher("qwen2").config.save_pretrained(tmp_path)
    cfg = dataclasses.replace(ConvertConfig().step2, seq_len=256)
    estimate = batching.peak_estimator(tmp_path, "rad-rwkv7", 2, cfg, 1)
    for batch in (3, 17):
        row = next(s for s in plan(tmp_path, seq_len=256, batch_size=batch).steps if s.name == "step 2 (KL)")
        assert estimate(batch) == pytest.approx(row.per_gpu_bytes(1), rel=1e-9)


@pytest.mark.parametrize("memory_gb, expected", [(1e3, 128), (0.3, None)])
def test_step_is_sized_to_the_memory_the_device_reports(tmp_path, monkeypatch, memory_gb, expected):
    make_teacher("qwen2").config.save_pretrained(tmp_path)
    monkeypatch.setattr(batching, "available_bytes", lambda device: memory_gb * GB)
    step1 = ConvertConfig().step1
    estimate = batching.peak_estimator(tmp_path, "rad-rwkv7", 1, step1, 1)
    sized, choice = batching.size_step(step1, 1, CUDA, 1, tmp_path, "rad-rwkv7")
    if expected is None:  # tiny model, but 0.3 GB: the largest divisor whose estimate fits
        expected = max(d for d in (1, 2, 4, 8, 16, 32, 64, 128) if estimate(d) <= 0.85 * memory_gb * GB)
    assert (sized.batch_size, sized.grad_accum) == (expected, 128 // expected)
    assert sized.tokens_per_update == 128 * step1.seq_len  # the global batch is kept
    assert choice.estimated_peak_gb == pytest.approx(estimate(expected) / GB)
    # a given micro-batch is kept as given; with the optimizer given too, nothing is chosen
    given = dataclasses.replace(step1, batch_size=3, grad_accum=2, optimizer="adamw-8bit")
    assert batching.size_step(given, 1, CUDA, 1, tmp_path, "rad-rwkv7") == (given, None)
    monkeypatch.setattr(batching, "installed", lambda: ("adamw",))  # torchao or not: auto takes adamw
    sized, choice = batching.size_step(
        dataclasses.replace(given, optimizer="auto"), 1, CUDA, 1, tmp_path, "rad-rwkv7"
    )
    assert (sized.batch_size, sized.grad_accum, sized.optimizer, choice.optimizer) == (3, 2, "adamw", "adamw")


def _trainer(micro_batch: int) -> Trainer:
    torch.manual_seed(0)
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    cfg = dataclasses.replace(ConvertConfig().step3, seq_len=16, batch_size=micro_batch, lr=1e-2)
    return Trainer(
        ContextExtension(), student, cfg, None, [], None, None, torch.device("cpu"), progress=False
    )


def test_an_update_out_of_memory_runs_again_with_smaller_micro_batches():
    batch = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(1))
    reference = _trainer(micro_batch=2)
    reference_loss = reference.train_step(itertools.repeat(batch), 1e-2)

    trainer = _trainer(micro_batch=8)
    objective_loss, tries = trainer.loss, []

    def loss_that_fits_two(part):
        tries.append(len(part))
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return objective_loss(part)

    trainer.loss = loss_that_fits_two
    loss = trainer.train_step(itertools.repeat(batch), 1e-2)
    assert tries == [8, 4, 2, 2, 2, 2] and trainer.micro_batch == 2
    # the same update as one run at 2 from the start: same loss, same weights, one optimizer step
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    for p, q in zip(trainer.params, reference.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == 1 for s in trainer.optimizer.state.values())
    # at one sequence there is nothing smaller to try: the error is the user's
    trainer.loss = lambda part: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    trainer.micro_batch = 1
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step(itertools.repeat(copy.copy(batch)), 1e-2)


def test_an_optimizer_step_out_of_memory_is_not_run_again():
    """The step may have updated some parameter groups before it ran out: running the update
    again would apply theirs twice, and a smaller micro-batch would not shrink its memory."""
    batch = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(1))
    trainer, steps = _trainer(micro_batch=4), []

    def step_out_of_memory(*args, **kwargs):
        steps.append(trainer.micro_batch)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer.optimizer.step = step_out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step(itertools.repeat(batch), 1e-2)
    assert steps == [4] and trainer.micro_batch == 4


def _config(argv):
    from radlads.cli.main import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["convert", *argv]))


def test_small_teachers_get_the_recipe_and_a_fitted_micro_batch_by_default(tmp_path):
    from tiny_models import make_teacher_folder

    teacher = make_teacher_folder(tmp_path / "teacher")
    base = ["--teacher", str(teacher), "--data", "d", "--out", "o"]
    cfg = _config(base)
    assert (cfg.step1.global_batch_size, cfg.step1.batch_size, cfg.step1.seq_len) == (128, None, 512)
    # step 2's 2,048 tokens, within the tiny teacher's trained 512 (as step 3)
    assert (cfg.step2.seq_len, cfg.step2.global_batch_size, cfg.step2.lr, cfg.step2.lr_final) == (
        512,
        32,
        1e-4,
        1e-5,
    )
    assert (cfg.step1.new_lr_scale, cfg.step2.new_lr_scale, cfg.step3.new_lr_scale) == (1.0, 10.0, 1.0)
    assert cfg.step3.seq_len == 512  # the tiny teacher's max_position_embeddings, under 16384
    assert cfg.step3.tokens == 10_000_000  # step 3 is part of the small teachers' recipe
    assert _config([*base, "--step3-tokens", "0"]).step3.tokens == 0
    # flags win over the preset; --batch-size fixes the micro-batch of steps 1-2
    cfg = _config(
        [*base, "--seq-len", "256", "--batch-size", "4", "--step2-lr", "3e-4", "--step2-new-lr-scale", "1"]
    )
    assert (cfg.step2.seq_len, cfg.step2.batch_size, cfg.step2.lr) == (256, 4, 3e-4)
    assert cfg.step2.new_lr_scale == 1.0
    cfg = _config([*base, "--global-batch-size", "64"])
    assert (cfg.step1.global_batch_size, cfg.step2.global_batch_size, cfg.step3.global_batch_size) == (
        64,
        64,
        8,
    )
    # a YAML config is taken as it is: no preset unless one is named
    (tmp_path / "run.yaml").write_text("step2: {seq_len: 1024, lr: 2.0e-5}\n")
    cfg = _config([*base, "--config", str(tmp_path / "run.yaml")])
    assert (cfg.step2.seq_len, cfg.step2.lr, cfg.step2.global_batch_size) == (1024, 2e-5, 128)
    # with a preset named too, what the YAML writes still wins over the preset
    (tmp_path / "run.yaml").write_text("step2: {seq_len: 1024}\nstep3: {tokens: 0}\n")
    cfg = _config([*base, "--config", str(tmp_path / "run.yaml"), "--preset", "auto"])
    assert (cfg.step2.seq_len, cfg.step2.lr, cfg.step2.global_batch_size) == (1024, 1e-4, 32)
    assert cfg.step3.tokens == 0
    (tmp_path / "run.yaml").write_text("")  # an empty config leaves the preset as it is
    assert _config([*base, "--config", str(tmp_path / "run.yaml"), "--preset", "auto"]).step2.seq_len == 512


def test_presets_by_teacher_size_from_the_library():
    from radlads.convert.presets import preset_steps, size_class

    qwen7b = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064)
    smol = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    assert (size_class(smol), size_class(qwen7b)) == ("small", "medium")
    steps = preset_steps("auto", smol | {"max_position_embeddings": 8192})
    assert (steps[3]["tokens"], steps[3]["seq_len"]) == (10_000_000, 8192)
    assert (steps[2]["new_lr_scale"], steps[2]["lr"]) == (10.0, 1e-4)
    assert "new_lr_scale" not in preset_steps("auto", qwen7b | {"max_position_embeddings": 32768})[2]
    assert preset_steps("auto", qwen7b | {"max_position_embeddings": 32768})[3]["seq_len"] == 16384
    # a teacher trained on 1,024 tokens: step 2 distils at its context, not the recipe's 2,048
    short = preset_steps("auto", smol | {"max_position_embeddings": 1024})
    assert (short[2]["seq_len"], short[3]["seq_len"]) == (1024, 1024)
    with pytest.raises(ValueError, match="unknown preset 'tiny'; choose one of auto, cpu-smoke"):
        preset_steps("tiny", smol)


def test_small_teachers_get_a_windowed_hybrid_by_default_from_the_library():
    from radlads.convert.presets import preset_student

    smol = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    qwen7b = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064)
    hybrid = {"softmax_layers": "auto:2"}
    assert preset_student("auto", smol | {"max_position_embeddings": 8192}) == hybrid | {
        "softmax_window": 8192
    }
    # the window is step 3's length: the trained context, up to the paper's 16,384
    assert preset_student("small", smol | {"max_position_embeddings": 32768}) == hybrid | {
        "softmax_window": 16384
    }
    assert preset_student("auto", smol | {"num_hidden_layers": 15}) == {}  # 2 layers would be over 1/8
    assert preset_student("auto", qwen7b) == preset_student("cpu-smoke", smol) == {}


def test_the_preset_shapes_the_student_unless_its_layers_are_named(tmp_path):
    from tiny_models import make_teacher_folder

    teacher = make_teacher_folder(tmp_path / "teacher", num_hidden_layers=16)  # trained context 512
    base = ["--teacher", str(teacher), "--data", "d", "--out", "o"]
    assert _config(base).student == {"softmax_layers": "auto:2", "softmax_window": 512}
    assert _config([*base, "--softmax-window", "64"]).student == {
        "softmax_layers": "auto:2",
        "softmax_window": 64,
    }
    assert _config([*base, "--softmax-layers", "none"]).student == {"softmax_layers": []}
    assert _config([*base, "--softmax-layers", "3,9"]).student == {"softmax_layers": [3, 9]}
    assert _config([*base, "--preset", "cpu-smoke"]).student == {}
    (tmp_path / "run.yaml").write_text("student: {softmax_layers: [4]}\n")
    assert _config([*base, "--config", str(tmp_path / "run.yaml"), "--preset", "auto"]).student == {
        "softmax_layers": [4]
    }
    small = make_teacher_folder(tmp_path / "small")  # 2 layers: the student stays pure
    assert _config(["--teacher", str(small), "--data", "d", "--out", "o"]).student == {}


def test_a_global_batch_that_does_not_split_over_the_processes_is_not_changed_silently(caplog):
    step3 = dataclasses.replace(ConvertConfig().step3, global_batch_size=4)
    with caplog.at_level("WARNING", logger="radlads"):
        sized, _ = batching.size_step(step3, 3, torch.device("cpu"), 8, "unused", "rad-rwkv7")
    assert sized.batch_size * sized.grad_accum * 8 == 8  # one sequence per process at least
    assert "global batch of 4 sequences does not split over 8 processes; each update takes 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="radlads"):
        batching.size_step(
            dataclasses.replace(step3, global_batch_size=16), 3, torch.device("cpu"), 8, "", ""
        )
    assert "does not split" not in caplog.text


@pytest.mark.parametrize("field", ["global_batch_size", "batch_size", "grad_accum", "seq_len"])
def test_batch_sizes_of_zero_or_less_are_refused_before_a_run(field):
    """A global batch of 0 failed at step 1 with a bare StopIteration (CPU) or a claim that one
    sequence does not fit (GPU); negative ones ran `plan` to negative memory."""
    with pytest.raises(ValueError, match=f"{field} 0 is not a count: give 1 or more"):
        dataclasses.replace(ConvertConfig().step1, **{field: 0})
    if field == "grad_accum":  # not a flag of plan's
        return
    from radlads.cli.main import main

    with pytest.raises(SystemExit):  # plan's flags: argparse's error
        main(["plan", "--teacher", "unused", f"--{field.replace('_', '-')}", "-4"])
