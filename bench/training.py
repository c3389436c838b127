"""Training throughput, peak memory and MFU of protocol steps 1-3: the radlads update vs a plain baseline.

For each teacher shape and step, two variants in the same run, on random tokens and random weights:
  radlads   what `radlads convert` runs: the step's objective from radlads.convert.steps, updated by
            Trainer.train_step (bf16 autocast on CUDA over fp32 master weights, fused AdamW, gradient
            clipping); the teacher in bf16 with transformers' default SDPA attention; the student's
            recurrence on its "auto" kernels (fla on CUDA); the chunked KL / cross-entropy losses.
  baseline  the same step written plainly: the teacher with eager attention, the student's recurrence
            on the pure-PyTorch "chunked" backend, step 2 = F.kl_div of full fp32 [B, T, V]
            log-softmaxes, step 3 = F.cross_entropy of full logits, step 1 = the same alignment loss;
            torch.optim.AdamW with its defaults (not fused); the same autocast and update loop.
The baseline may run out of memory at the batch radlads uses: the OOM is recorded and the baseline
runs again at --baseline-batch (halved until it fits), so that every step has a ratio.

FLOPs per token, counted from the models (T: sequence length, L: layers, d = H * N: query width,
V C: the LM head). A matmul with P weights costs 2P forward; backward 2P for the weight gradient
(where the weight trains) plus 2P for the input gradient (where the input needs one).
  step 1  teacher: 2 P_teacher_body + 2 T d L (causal attention: Q K^T and A V). The teacher runs
          without its LM head; its last MLP and final norm run but feed nothing (reported as wasted).
          student time mixers: 4 P_x + 6 P_in + 3 R. P_x: mixer weights that read the layer input,
          which is the teacher's and carries no gradient; P_in: the others (o_proj, LoRA ups).
  step 2  teacher: 2 (P_teacher_body + V C) + 2 T d L;  student: 6 (P_student_body + V C) + 3 R
  step 3  student: 6 (P_student_body + V C) + 3 R
R is the recurrence in its recurrent form, per token over layers and heads: 9 N^2 (RWKV-7) or 5 N^2
(GLA) forward, twice that backward (the chunked kernels do more work than this). Not counted:
recomputation (activation checkpointing only: the chunked losses compute their logit gradients in
forward and recompute nothing), norms, activations, softmaxes and other elementwise work. MFU = counted FLOPs per second
/ the dense bf16 matmul ceiling (--peak-tflops; 790 measured on H100 SXM in this project).

    PYTHONPATH=src python bench/training.py --budget-s 300 --out $OUT   # H100: both shapes, ~5 min
    PYTHONPATH=src python bench/training.py --tiny                      # CPU smoke run, seconds
    # one H200, the Qwen2.5-7B shape (docs/plan/qwen2.5-7b.json), with the optimizer state and
    # checkpointing `radlads plan --gpu-memory-gb 141` recommends for its steps 2-3 (not yet run)
    PYTHONPATH=src python bench/training.py --shapes qwen2.5-7b --optimizer adamw-bf16-state \
        --activation-checkpointing --batch 8,8,1 --step3-seq-len 16384 --no-baseline
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gzip
import itertools
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    GIB,
    PEAK_BF16_FLOPS,
    Budget,
    ModelCost,
    Stopwatch,
    add_run_arguments,
    build_student,
    build_teacher,
    default_out_dir,
    free_memory,
    guarded,
    kernel_family,
    markdown_table,
    median,
    peak_memory,
    pick_device,
    reset_peak_memory,
    write_json,
)
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import radlads.kernels as kernels
from radlads.convert.steps import AttentionAlignment, ContextExtension, Distillation, prepare_student
from radlads.convert.teacher import prepare_teacher
from radlads.models.common import LinearMixer, LowRank
from radlads.train.config import ConvertConfig
from radlads.train.optimizers import OPTIMIZERS
from radlads.train.trainer import Trainer

STEPS = (1, 2, 3)
# radlads-keep (with --keep): radlads with keep_kernel_intermediates; radlads-keep-break (with
# --graph-break): radlads-keep calling fla's own entry point, a graph break in every compiled layer, as
# before radlads::rwkv7_chunk; radlads-eager (with --eager): radlads not compiled.
VARIANTS = ("radlads", "radlads-keep", "radlads-keep-break", "radlads-eager", "baseline")
KEEPS = ("radlads-keep", "radlads-keep-break")
# First guesses of MFU for the time estimates; measured cells replace them as the run goes.
GUESSED_MFU = {
    "radlads": 0.2,
    "radlads-keep": 0.2,
    "radlads-keep-break": 0.2,
    "radlads-eager": 0.15,
    "baseline": 0.01,
}
FLA_RUNS = kernels._fla_runs
SETUP_S = 5.0  # copying the student to the device and building the optimizer, per attempt
TINY = dict(
    shapes="tiny",
    seq_len=32,
    step3_seq_len=64,
    batch="2,2,2",
    keep_batch="2,2,2",
    baseline_batch="1,1,1",
    warmup=1,
    updates=2,
)
TINY["budget_s"] = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-0.5b,smollm2-135m", help="teacher shapes (common.SHAPES)")
    p.add_argument("--arch", default="rad-rwkv7", help="student: rad-rwkv7 or rad-rwkv6")
    p.add_argument("--steps", default="1,2,3")
    p.add_argument("--seq-len", type=int, default=512, help="steps 1 and 2 (the paper's length)")
    p.add_argument("--step3-seq-len", type=int, default=2048)
    p.add_argument("--batch", default="128,48,12", help="sequences per micro-batch for steps 1,2,3")
    p.add_argument(
        "--baseline-batch",
        default="8,4,1",
        help="steps 1,2,3: the baseline's batch after an OOM at --batch (halved while it still OOMs)",
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="untimed updates (Triton compiles and autotunes)")
    p.add_argument("--updates", type=int, default=5, help="timed updates, at most; >= 1")
    p.add_argument("--max-timed-s", type=float, default=6.0, help="fewer timed updates past this")
    p.add_argument("--activation-checkpointing", action="store_true", help="radlads rows, as in convert")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="radlads rows, as `radlads convert --optimizer` (adamw-bf16-state and adamw-8bit: radlads[torchao])",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="radlads rows: as `radlads convert --no-compile`"
    )
    p.add_argument("--eager", action="store_true", help="also rows radlads-eager: radlads, not compiled")
    p.add_argument(
        "--keep",
        action="store_true",
        help="also rows radlads-keep: radlads as `radlads convert --keep-kernel-intermediates`",
    )
    p.add_argument(
        "--keep-batch", default="96,56,12", help="steps 1,2,3: radlads-keep's batch (fills an 80 GB H100)"
    )
    p.add_argument(
        "--graph-break",
        action="store_true",
        help="also rows radlads-keep-break: radlads-keep with fla's entry point as a graph break (the old path)",
    )
    p.add_argument("--no-baseline", action="store_true", help="no baseline rows (e.g. measured already)")
    p.add_argument(
        "--no-radlads", action="store_true", help="no plain radlads rows (only the variants asked for)"
    )
    p.add_argument("--baseline-backend", default="chunked", help="the baseline's recurrence kernels")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS / 1e12, help="MFU's ceiling")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip cells that would end later")
    add_run_arguments(p)
    p.add_argument("--profile", type=int, default=0, help="CUDA: the N kernels with most GPU time per row")
    p.add_argument("--trace", action="store_true", help="with --profile: radlads rows' timelines, to --out")
    args = p.parse_args(argv)
    if args.tiny:  # new defaults; flags given explicitly still win
        p.set_defaults(**TINY)
        args = p.parse_args(argv)
    if args.updates < 1:
        p.error("--updates must be >= 1")
    if args.trace and not args.profile:
        p.error("--trace needs --profile N (the trace is the profiled update's)")
    if args.optimizer != "adamw" and not args.no_baseline:
        # the baseline trains with fp32 AdamW: its ratios would count the optimizer change too
        p.error(f"--optimizer {args.optimizer} needs --no-baseline (the baseline's optimizer is adamw)")
    args.variants = [
        v
        for v in VARIANTS
        if (args.eager or v != "radlads-eager")
        and (args.keep or v != "radlads-keep")
        and (args.graph_break or v != "radlads-keep-break")
        and not (args.no_baseline and v == "baseline")
        and not (args.no_radlads and v == "radlads")
    ]
    args.steps = sorted(int(s) for s in args.steps.split(","))  # step 3 frees the teacher: last
    args.batch = dict(zip(STEPS, (int(b) for b in args.batch.split(","))))
    args.baseline_batch = dict(zip(STEPS, (int(b) for b in args.baseline_batch.split(","))))
    args.keep_batch = dict(zip(STEPS, (int(b) for b in args.keep_batch.split(","))))
    args.out = args.out or default_out_dir()
    return args


# --------------------------------------------------------------------------- FLOPs


def mixer_weights(student: nn.Module) -> tuple[int, int]:
    """Matmul weights of the time mixers: (those reading the layer input x, the others).

    In step 1, x is the teacher's hidden state (no gradient): the first kind has no input gradient.
    """
    reads_x = inner = 0
    for mixer in (m for m in student.modules() if isinstance(m, LinearMixer)):
        first = {mixer.q_proj, mixer.k_proj, mixer.v_proj}
        first |= {m.down for m in mixer.modules() if isinstance(m, LowRank)}
        if isinstance(mixer.gate, nn.Linear):  # RAD-RWKV7's full-rank gate
            first.add(mixer.gate)
        for linear in (m for m in mixer.modules() if isinstance(m, nn.Linear)):
            if linear in first:
                reads_x += linear.weight.numel()
            else:
                inner += linear.weight.numel()
    return reads_x, inner


def step_flops(step: int, teacher: ModelCost, student: ModelCost, mixers: tuple[int, int], T: int) -> dict:
    """FLOPs per token of one update of `step`, by part (formulas: module docstring)."""
    t_body = teacher.matmul_params - teacher.lm_head_params
    s_all = student.matmul_params  # body and LM head (tied at step 0; untied, the head keeps its size)
    reads_x, inner = mixers
    flops = dict(
        teacher_matmul={1: 2 * t_body, 2: 2 * teacher.matmul_params, 3: 0}[step],
        teacher_attention=0 if step == 3 else 2 * T * teacher.heads * teacher.head_dim * teacher.layers,
        student_matmul=4 * reads_x + 6 * inner if step == 1 else 6 * s_all,
        student_recurrence=3 * student.recurrence_flops_per_token(),
    )
    flops["total"] = sum(flops.values())
    # Included above because it runs: step 1's teacher computes its last gated MLP for nothing.
    flops["wasted"] = 2 * 3 * teacher.hidden * teacher.intermediate if step == 1 else 0
    return flops


# --------------------------------------------------------------------------- the baseline's losses


class PlainDistillation(Distillation):
    """Step 2 as written without care for memory: full fp32 [B, T, V] log-probabilities of both models."""

    def loss(self, student, batch):
        s_logp = F.log_softmax(student(input_ids=batch).logits.float(), dim=-1).flatten(0, 1)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=batch, use_cache=False).logits
            t_logp = F.log_softmax(t_logits.float(), dim=-1).flatten(0, 1)
        return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")  # mean over tokens


class PlainContextExtension(ContextExtension):
    """Step 3 as written without care for memory: cross-entropy of the full logits."""

    def loss(self, student, batch):
        logits = student(input_ids=batch).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


# --------------------------------------------------------------------------- one attempt


def make_trainer(variant: str, step: int, teacher, student, args, batch: int, device) -> Trainer:
    """The step's objective and update, as `radlads convert` builds them or as the baseline does."""
    cfg = ConvertConfig()
    seq_len = args.step3_seq_len if step == 3 else args.seq_len
    step_cfg = dataclasses.replace(
        cfg.steps()[step],
        seq_len=seq_len,
        batch_size=batch,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
    )
    radlads = variant != "baseline"
    compile = variant in ("radlads", *KEEPS) and not args.no_compile
    if teacher is not None:
        teacher.set_attn_implementation("sdpa" if radlads else "eager")
        prepare_teacher(teacher, compile and device.type == "cuda", whole_layers=step == 2)
    # Before prepare_student, which resets Dynamo: compiled code keeps _fla_runs' answer.
    kernels._fla_runs = (lambda backend, on_cuda: False) if variant == "radlads-keep-break" else FLA_RUNS
    if radlads:
        keep = variant in KEEPS
        prepare_student(student, args.activation_checkpointing, compile and device.type == "cuda", keep)
    if not radlads:
        student.config.kernel_backend = args.baseline_backend  # the mixers share this config
    objective = {
        (1, True): lambda: AttentionAlignment(teacher, compile),
        (2, True): lambda: Distillation(teacher, cfg.kl_chunk_tokens, compile),
        (3, True): lambda: ContextExtension(cfg.kl_chunk_tokens, compile),
        (1, False): lambda: AttentionAlignment(teacher, compile=False),
        (2, False): lambda: PlainDistillation(teacher),
        (3, False): lambda: PlainContextExtension(),
    }[step, radlads]()
    trainer = Trainer(objective, student, step_cfg, None, [], None, None, device, progress=False)
    if not radlads:
        trainer.optimizer = torch.optim.AdamW(
            trainer.params, lr=step_cfg.lr, betas=step_cfg.betas, weight_decay=step_cfg.weight_decay
        )
    return trainer


def host_syncs(update, device: torch.device) -> list[str] | None:
    """Where update() synchronised with the host (file:line of each call, as torch's CUDA sync
    debug mode reports them): update() does not read its loss, so each is a stall to remove."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def gpu_kernels(events) -> list:
    """The GPU kernels among profiler events: not CPU ops, nor the GPU-side spans of
    `record_function` regions (the optimizer's step is one), which would count kernels twice."""
    return [
        e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]


def profile_update(update, top: int, trace: Path | None = None) -> dict:
    """One update under torch.profiler: its GPU kernel time (`gpu_kernels`), by kernel family and
    the `top` kernels. With `trace`, the timeline goes there too (gzipped Chrome trace: open it in
    Perfetto to see where the GPU waits). GPU activity only: recording the host's ops slowed the
    host enough to triple the GPU's idle time in step 2's traces (36 ms against 13 ms unprofiled).
    Without CUDA (the CPU tests), the host's ops."""
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        update()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    kernels = gpu_kernels(prof.key_averages())
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in kernels) or 1.0
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + e.self_device_time_total / 1e3
    return dict(
        kernel_ms=total_us / 1e3,
        kernel_launches=sum(e.count for e in kernels),
        families={
            k: dict(ms=v, share=v * 1e3 / total_us)
            for k, v in sorted(families.items(), key=lambda kv: -kv[1])
        },
        top_kernels=[
            dict(
                name=e.key[:90],
                ms=e.self_device_time_total / 1e3,
                share=e.self_device_time_total / total_us,
                calls=e.count,
            )
            for e in kernels[:top]
        ],
    )


def measure(cell: dict, teacher, student0, args, device, budget: Budget, row: dict) -> None:
    """Warm up, then time updates of one variant at one batch, filling `row`."""
    # fp32 master weights on the device, as convert loads each step's student.
    student = copy.deepcopy(student0).to(device=device, dtype=torch.float32).train()
    trainer = make_trainer(row["variant"], cell["step"], teacher, student, args, row["batch"], device)
    # One update's sequences: the trainer runs them as micro-batches of row["batch"].
    ids = torch.randint(0, cell["vocab"], (row["batch"] * args.grad_accum, cell["seq_len"]), device=device)
    batches: Iterator[torch.Tensor] = itertools.repeat(ids)  # data loading is not what is measured here

    def update() -> torch.Tensor:
        return trainer.train_step(batches, trainer.cfg.lr)

    started, last_s = time.monotonic(), None
    for _ in range(args.warmup):
        t0 = time.monotonic()
        update().item()
        last_s = time.monotonic() - t0
        if budget.left() < 0:
            row["status"] = "stopped (budget)"
            return
    row["warmup_s"] = time.monotonic() - started
    # As Trainer.run drives them: back to back, each loss read once the next update is queued,
    # timed on the GPU's timeline from the end of one update to the end of the next.
    timed = args.updates if last_s is None else max(1, min(args.updates, int(args.max_timed_s / last_s)))
    reset_peak_memory(device)
    watch = Stopwatch(device).start()
    queued = update()  # untimed: it starts from an idle GPU, as no update of a run does after the first
    watch.mark()
    for _ in range(timed):
        loss = update()
        row["loss"] = queued.item()
        queued = loss
        watch.mark()
    row["loss"] = queued.item()
    times = watch.intervals_ms()[1:]
    peak = peak_memory(device)
    update_s = median(times) / 1e3
    tok_s = row["tokens_per_update"] / update_s
    row.update(
        updates=len(times),
        update_ms=update_s * 1e3,
        tok_s=tok_s,
        tflops_s=tok_s * cell["flops"]["total"] / 1e12,
        mfu=tok_s * cell["flops"]["total"] / (args.peak_tflops * 1e12),
        peak_gb=None if peak is None else peak / GIB,
        status="ok" if math.isfinite(row["loss"]) else "ok (non-finite loss)",
        optimizer=type(trainer.optimizer).__name__,  # the class the update ran, not the flag
    )
    sites = host_syncs(update, device)
    if sites is not None:
        row.update(host_syncs=len(sites), sync_sites=sites)
    if args.profile and device.type == "cuda":
        name = f"trace-{cell['shape']}-step{cell['step']}-{row['variant']}-b{row['batch']}.json.gz"
        # The baseline's ~100k launches would make a trace too big to bring back from the GPU.
        trace = args.trace and row["variant"] != "baseline"
        row.update(profile_update(update, args.profile, args.out / name if trace else None))
        # Below 1, the GPU waits on the host (launches, syncs) for part of each update.
        row["gpu_busy"] = row["kernel_ms"] / row["update_ms"]


def batch_sizes(first: int, fallback: int) -> Iterator[int]:
    """The batch to try, then after each OOM a smaller one: `fallback`, then halving to 1."""
    yield first
    batch = min(fallback, first // 2)
    while batch >= 1:
        yield batch
        batch //= 2


def guessed_update_s(cell: dict, variant: str, batch: int, args) -> float:
    flops = cell["flops"]["total"] * batch * cell["seq_len"] * args.grad_accum
    return flops / (args.peak_tflops * 1e12 * GUESSED_MFU[variant])


def estimate_s(cell: dict, variant: str, batch: int, args, calibration: dict) -> float:
    """Wall time of an attempt, from the guessed MFU times what earlier cells measured against it."""
    scale = median(calibration[variant]) if calibration[variant] else 1.0
    return SETUP_S + (args.warmup + args.updates) * guessed_update_s(cell, variant, batch, args) * scale


def run_variant(cell, variant, teacher, student0, args, device, budget, calibration) -> list[dict]:
    """One variant of one (shape, step) cell: its rows, an OOM row per batch that did not fit."""
    rows = []
    first = (args.keep_batch if variant in KEEPS else args.batch)[cell["step"]]
    fallback = args.baseline_batch[cell["step"]] if variant == "baseline" else first // 2
    for batch in batch_sizes(first, fallback):
        row = dict(shape=cell["shape"], step=cell["step"], variant=variant, batch=batch)
        row.update(seq_len=cell["seq_len"], tokens_per_update=batch * cell["seq_len"] * args.grad_accum)
        rows.append(row)
        if budget.left() < SETUP_S:
            row["status"] = "skipped (budget)"
            break
        if estimate_s(cell, variant, batch, args, calibration) > budget.left():
            row["status"] = "skipped (budget)"
            continue  # a smaller batch may still fit in what is left
        guarded(functools.partial(measure, cell, teacher, student0, args, device, budget, row), row, device)
        if "update_ms" in row:
            calibration[variant].append(row["update_ms"] / 1e3 / guessed_update_s(cell, variant, batch, args))
        print(
            f"{cell['shape']} step {cell['step']} {variant} B={batch}: {row['status']}, "
            f"{row.get('tok_s', float('nan')):,.0f} tok/s, MFU {row.get('mfu', float('nan')):.3f}",
            flush=True,
        )
        if row["status"] != "OOM":
            break
    return rows


# --------------------------------------------------------------------------- the grid


def ratios(results: list[dict]) -> list[dict]:
    """Per (shape, step), each variant at the largest batch that ran, against radlads: the baseline's
    ratio, and what compiling (--eager) and keeping fla's intermediates (--keep) gain; and
    radlads-keep against radlads-keep-break (--graph-break): what the custom op gains."""
    out = []
    for (shape, step), rows in itertools.groupby(results, key=lambda r: (r["shape"], r["step"])):
        ran = {}
        for r in rows:
            if "tok_s" in r:
                ran.setdefault(r["variant"], r)
        rad, base, eager = ran.get("radlads"), ran.get("baseline"), ran.get("radlads-eager")
        keep, keep_break = ran.get("radlads-keep"), ran.get("radlads-keep-break")
        row = dict(shape=shape, step=step)
        if keep:
            row.update(keep_batch=keep["batch"], keep_mfu=keep["mfu"])
        if keep and keep_break and keep_break["batch"] == keep["batch"]:
            row.update(keep_break_mfu=keep_break["mfu"], op_gain=keep["tok_s"] / keep_break["tok_s"])
        if rad:
            row.update(radlads_batch=rad["batch"], radlads_mfu=rad["mfu"])
        if rad and eager and eager["batch"] == rad["batch"]:
            row["compile_gain"] = rad["tok_s"] / eager["tok_s"]
        if rad and keep:  # each at its own batch
            row["keep_gain"] = keep["tok_s"] / rad["tok_s"]
        if rad and base:
            # Peaks compare only at one batch; at two, the baseline ran out of memory at radlads'.
            same_batch = rad["batch"] == base["batch"] and base["peak_gb"]
            row.update(
                baseline_batch=base["batch"],
                tok_s_ratio=rad["tok_s"] / base["tok_s"],
                baseline_mfu=base["mfu"],
                radlads_peak_gb=rad["peak_gb"],
                baseline_peak_gb=base["peak_gb"],
                peak_mem_ratio=rad["peak_gb"] / base["peak_gb"] if same_batch else None,
            )
        if row.keys() & {"op_gain", "compile_gain", "keep_gain", "tok_s_ratio"}:
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Past Dynamo's recompile limit a compiled function silently runs eagerly: here, an error row.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    budget = Budget(args.budget_s)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the teacher's, as in convert
    results: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    calibration: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def save():
        return write_json(args.out, "training", dict(args=vars(args), cells=cells, results=results))

    for shape in args.shapes.split(","):
        teacher = build_teacher(shape, device, dtype)
        student0 = build_student(teacher, args.arch).to("cpu")  # step 0, copied for every attempt
        costs = ModelCost.of(teacher), ModelCost.of(student0)
        mixers = mixer_weights(student0)
        print(f"{shape}: teacher and student built at {budget.elapsed():.0f} s", flush=True)
        for step in args.steps:
            if step == 3 and teacher is not None:  # step 3 has no teacher (convert frees it too)
                teacher = None
                free_memory(device)
            seq_len = args.step3_seq_len if step == 3 else args.seq_len
            cell = dict(shape=shape, step=step, seq_len=seq_len, vocab=costs[0].vocab)
            cell["flops"] = step_flops(step, *costs, mixers, seq_len)
            cells.append(cell)
            for variant in args.variants:
                results += run_variant(cell, variant, teacher, student0, args, device, budget, calibration)
                save()  # after every variant: a run killed from outside keeps what it measured
        del teacher, student0
        free_memory(device)

    path = save()
    show(cells, results, args)
    print(f"\nraw numbers: {path}  (total {budget.elapsed():.0f} s)")
    errors = [r for r in results if r.get("status", "").startswith("error")]
    if errors:  # the rows and the JSON are written; the exit status tells scripts it went wrong
        raise SystemExit(f"{len(errors)} row(s) failed, the first: {errors[0]['status']}")


def show(cells, results, args) -> None:
    plan = [dict(shape=c["shape"], step=c["step"], seq_len=c["seq_len"], **c["flops"]) for c in cells]
    print("\n## FLOPs per token (counted)\n" + markdown_table(plan, list(plan[0]) if plan else []))
    columns = ["shape", "step", "variant", "batch", "seq_len", "update_ms", "tok_s", "tflops_s", "mfu"]
    columns += ["peak_gb", "host_syncs", "gpu_busy", "warmup_s", "status"]
    print(f"\n## Results (MFU against {args.peak_tflops:g} TFLOP/s)\n" + markdown_table(results, columns))
    ratio_rows = ratios(results)
    columns = list(dict.fromkeys(k for r in ratio_rows for k in r))
    print("\n## Ratios against radlads (same run)\n" + markdown_table(ratio_rows, columns))
    for r in results:
        where = f"{r['shape']} step {r['step']} {r['variant']} B={r['batch']}"
        if r.get("sync_sites"):
            print(f"\nhost syncs, {where}: " + ", ".join(r["sync_sites"]))
        if r.get("top_kernels"):
            print(
                f"\n## GPU time, {where}: {r['kernel_ms']:.1f} ms of kernels ({r['kernel_launches']} launches) "
                f"in a {r['update_ms']:.1f} ms update (busy {r['gpu_busy']:.2f})\n"
                + markdown_table(
                    [dict(family=k, **v) for k, v in r["families"].items()], ["family", "ms", "share"]
                )
                + "\n\n"
                + markdown_table(r["top_kernels"], ["name", "ms", "share", "calls"])
            )


if __name__ == "__main__":
    main()
