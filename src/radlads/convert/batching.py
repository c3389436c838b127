"""The micro-batch of each step: the largest that the memory plan says fits the device, with the
global batch kept by gradient accumulation.

A user asks for a global batch (sequences per optimizer update); how many of them one forward
can take depends on the GPU. `radlads.convert.plan` estimates a step's peak from the teacher's
config alone, and the choice is the largest divisor of the per-process batch whose estimate fits
the device's memory. Where the estimate is off,
the trainer halves the micro-batch on an out-of-memory error and runs the same update again.

The optimizer, where the step asks for "auto", is chosen with it: the most precise of
radlads.train.optimizers.OPTIMIZERS (torchao's only where it is installed) under which a
micro-batch of at least MIN_MICRO_TOKENS tokens fits (AdamW's fp32 moments take 8 of a 7B
student's 16 bytes per parameter; bf16 or 8-bit moments leave room for activations where fp32
ones would not).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train.config import StepConfig
from ..train.optimizers import DEFAULT, OPTIMIZERS, installed
from .plan import GB, plan

log = logging.getLogger("radlads")

# Of the memory the process could take: the rest covers the CUDA context, the allocator's
# fragmentation and the estimate's own error (within ~8% of measured peaks, docs/guide.md).
USABLE_FRACTION = 0.85
# What a process's CUDA context takes before convert sizes a step: `radlads plan` subtracts it from
# a GPU's total (an H200's 150.75 GB showed 149.5 GB available at a step's start).
CUDA_CONTEXT_BYTES = 1.3e9
# Without a GPU there is no memory plan: a micro-batch of this many sequences at most.
CPU_MICRO_BATCH = 8
# "auto" takes a smaller optimizer state before a micro-batch under this many tokens: below it a
# large teacher's matmuls leave the GPU underused.
MIN_MICRO_TOKENS = 4096


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int  # sequences per forward, per process
    grad_accum: int
    estimated_peak_gb: float | None  # the plan's peak per GPU at this micro-batch (None on CPU)
    available_gb: float | None  # memory the process could take when it chose
    optimizer: str = DEFAULT

    @property
    def fits(self) -> bool:
        """Whether the plan's estimate is within the usable memory (True on the CPU: no plan)."""
        return self.estimated_peak_gb is None or self.estimated_peak_gb <= self.available_gb * USABLE_FRACTION

    def describe(self, step: int, cfg: StepConfig, world_size: int) -> str:
        per_update = self.micro_batch * self.grad_accum * world_size
        text = (
            f"step {step}: micro-batch {self.micro_batch} x {cfg.seq_len} tokens, {self.grad_accum} "
            f"accumulated x {world_size} process(es) = {per_update} sequences per update, "
            f"optimizer {self.optimizer}"
        )
        if self.estimated_peak_gb is not None:
            text += (
                f"; estimated peak {self.estimated_peak_gb:.1f} GB of {self.available_gb:.1f} GB available"
            )
        return text


def available_bytes(device: torch.device) -> float:
    """What this process could hold on `device`: the free memory plus what its allocator keeps."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def _plan_row(step: int, activation_checkpointing: bool) -> str:
    """The name of `step`'s row in a ConversionPlan (step 1 has one row: its activations are the
    captured teacher layers', which checkpointing the mixers does not shrink)."""
    if step == 1:
        return "step 1 (alignment)"
    loss = "KL" if step == 2 else "CE"
    return f"step {step} ({loss}, act. ckpt)" if activation_checkpointing else f"step {step} ({loss})"


def peak_estimator(
    teacher_dir: str | Path,
    arch: str,
    step: int,
    cfg: StepConfig,
    world_size: int,
    activation_checkpointing: bool = False,
    **options,
) -> Callable[[int], float]:
    """micro-batch -> the plan's per-GPU peak bytes for `step`. `options`: plan's
    (softmax_layers, keep_kernel_intermediates, tilelang)."""
    name = _plan_row(step, activation_checkpointing)
    seq = dict(seq_len=cfg.seq_len, step3_seq_len=cfg.seq_len)

    @functools.cache
    def at(batch: int) -> float:
        memory = plan(teacher_dir, arch, batch_size=batch, step3_batch_size=batch, **seq, **options)
        return next(s for s in memory.steps if s.name == name).per_gpu_bytes(world_size)

    return at


def choose(
    global_batch: int,
    world_size: int,
    peak: Callable[[int], float] | None,
    available: float | None,
    optimizer: str = DEFAULT,
) -> BatchChoice:
    """The largest divisor of the per-process batch whose estimated peak (under `optimizer`) fits
    `available` bytes (USABLE_FRACTION of it); on the CPU (`peak` None) the largest divisor up to
    CPU_MICRO_BATCH."""
    per_process = -(-global_batch // world_size)
    divisors = [d for d in range(per_process, 0, -1) if per_process % d == 0]
    if peak is None:
        micro = next(d for d in divisors if d <= CPU_MICRO_BATCH)
        return BatchChoice(micro, per_process // micro, None, None, optimizer)
    budget = available * USABLE_FRACTION
    micro = next((d for d in divisors if peak(d) <= budget), None)
    if micro is None:
        raise ValueError(
            f"even one sequence per micro-batch is estimated at {peak(1) / GB:.1f} GB, over the "
            f"{budget / GB:.1f} GB this GPU has free to use; use --activation-checkpointing, more GPUs "
            "(--nproc) or a shorter --seq-len (see `radlads plan`)"
        )
    return BatchChoice(micro, per_process // micro, peak(micro) / GB, available / GB, optimizer)


def choose_optimizer(
    global_batch: int,
    world_size: int,
    peaks: dict[str, Callable[[int], float]],
    available: float,
    seq_len: int,
    micro_batch: int | None = None,
) -> BatchChoice:
    """`choose` under the first optimizer of `peaks` (most precise first) whose micro-batch holds
    at least MIN_MICRO_TOKENS tokens (or the whole per-process batch); else under the one that
    fits the largest. With `micro_batch` given, the first under which that micro-batch fits, else
    the last (the trainer halves it where it runs out of memory)."""
    per_process = -(-global_batch // world_size)
    if micro_batch is not None:
        budget = available * USABLE_FRACTION
        name = next((n for n, peak in peaks.items() if peak(micro_batch) <= budget), list(peaks)[-1])
        peak = peaks[name](micro_batch) / GB
        return BatchChoice(micro_batch, per_process // micro_batch, peak, available / GB, name)
    wanted = min(per_process, -(-MIN_MICRO_TOKENS // seq_len))
    fitting, error = [], None
    for name, peak in peaks.items():
        try:
            choice = choose(global_batch, world_size, peak, available, name)
        except ValueError as err:
            error = err
            continue
        if choice.micro_batch >= wanted:
            return choice
        fitting.append(choice)
    if not fitting:
        raise error
    return max(fitting, key=lambda c: c.micro_batch)


def one_gpu_settings(
    teacher_dir: str | Path,
    arch: str,
    step: int,
    cfg: StepConfig,
    gpu_bytes: float,
    checkpointing: bool | None = None,
    **plan_options,
) -> tuple[bool, BatchChoice]:
    """What `step` should run with on one GPU of `gpu_bytes`: the micro-batch (cfg's, or as
    size_step chooses it from cfg's global batch), the optimizer that "auto" takes with
    radlads[torchao] installed, and (`checkpointing` None) activation checkpointing only where
    without it nothing fits, or only a micro-batch under MIN_MICRO_TOKENS tokens that checkpointing
    would lift; a bool sets it. Step 1's estimate does not depend on it: its activations are the
    captured teacher layers'. The choice's `fits` says whether even that is estimated to fit."""
    given = cfg.batch_size is not None
    global_batch = cfg.batch_size * cfg.grad_accum if given else cfg.global_batch_size
    wanted = cfg.batch_size if given else min(global_batch, -(-MIN_MICRO_TOKENS // cfg.seq_len))
    if step == 1:
        choices = (False,)
    else:
        choices = (False, True) if checkpointing is None else (checkpointing,)
    options = []
    for ckpt in choices:
        peaks = {
            name: peak_estimator(teacher_dir, arch, step, cfg, 1, ckpt, optimizer=name, **plan_options)
            for name in OPTIMIZERS
        }
        try:
            choice = choose_optimizer(global_batch, 1, peaks, gpu_bytes, cfg.seq_len, cfg.batch_size)
        except ValueError:  # not even one sequence fits: the smallest micro-batch, marked as not fitting
            choice = choose_optimizer(global_batch, 1, peaks, gpu_bytes, cfg.seq_len, 1)
        if choice.fits and choice.micro_batch >= wanted:
            return ckpt, choice
        options.append((ckpt, choice))
    return next((o for o in options if o[1].fits), options[-1])


def size_step(
    cfg: StepConfig,
    step: int,
    device: torch.device,
    world_size: int,
    teacher_dir: str | Path,
    arch: str,
    **plan_options,
) -> tuple[StepConfig, BatchChoice | None]:
    """`cfg` with its micro-batch, accumulation and optimizer set: as given where given, else chosen
    for the device. The choice is None where the user gave both the micro-batch and the optimizer,
    or the micro-batch on the CPU (no memory plan there: "auto" is DEFAULT)."""
    on_gpu = device.type == "cuda"
    auto = cfg.optimizer == "auto"
    if not on_gpu and auto:
        cfg = dataclasses.replace(cfg, optimizer=DEFAULT)
    if cfg.batch_size is not None and not (on_gpu and auto):
        return cfg, None
    if on_gpu:
        names = installed() if auto else (cfg.optimizer,)
        peaks = {
            name: peak_estimator(teacher_dir, arch, step, cfg, world_size, optimizer=name, **plan_options)
            for name in names
        }
        given = cfg.batch_size is not None
        global_batch = cfg.batch_size * cfg.grad_accum * world_size if given else cfg.global_batch_size
        try:
            choice = choose_optimizer(
                global_batch, world_size, peaks, available_bytes(device), cfg.seq_len, cfg.batch_size
            )
        except ValueError as err:
            if auto and len(names) < len(OPTIMIZERS):
                raise ValueError(
                    f"{err}; or install radlads[torchao], whose smaller optimizer states (--optimizer) "
                    "leave more room for activations"
                ) from err
            raise
    else:
        choice = choose(cfg.global_batch_size, world_size, None, None, cfg.optimizer)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(choice.describe(step, cfg, world_size))
        asked = cfg.global_batch_size if cfg.batch_size is None else None
        if asked is not None and asked % world_size:  # every process takes as many sequences
            log.warning(
                f"step {step}: a global batch of {asked} sequences does not split over {world_size} "
                f"processes; each update takes {choice.micro_batch * choice.grad_accum * world_size}. "
                f"To keep {asked}, give a multiple of {world_size} (--global-batch-size for steps 1-2, "
                f"step{step}: {{global_batch_size: N}} in --config) or a process count that divides it"
            )
    sized = dict(batch_size=choice.micro_batch, grad_accum=choice.grad_accum, optimizer=choice.optimizer)
    return dataclasses.replace(cfg, **sized), choice
