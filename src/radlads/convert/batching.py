"""The micro-batch of each step: the largest that the memory plan says fits the device, with the
global batch kept by gradient accumulation.

A user asks for a global batch (sequences per optimizer update); how many of them one forward
can take depends on the GPU. `radlads.convert.plan` estimates a step's peak from the teacher's
config alone, and the choice is the largest divisor of the per-process batch whose estimate fits
the device's memory. Where the estimate is off,
the trainer halves the micro-batch on an out-of-memory error and runs the same update again.
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
from .plan import GB, plan

log = logging.getLogger("radlads")

# Of the memory the process could take: the rest covers the CUDA context, the allocator's
# fragmentation and the estimate's own error (within ~8% of measured peaks, docs/guide.md).
USABLE_FRACTION = 0.85
# Without a GPU there is no memory plan: a micro-batch of this many sequences at most.
CPU_MICRO_BATCH = 8


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int  # sequences per forward, per process
    grad_accum: int
    estimated_peak_gb: float | None  # the plan's peak per GPU at this micro-batch (None on CPU)
    available_gb: float | None  # memory the process could take when it chose

    def describe(self, step: int, cfg: StepConfig, world_size: int) -> str:
        per_update = self.micro_batch * self.grad_accum * world_size
        text = (
            f"step {step}: micro-batch {self.micro_batch} x {cfg.seq_len} tokens, {self.grad_accum} "
            f"accumulated x {world_size} process(es) = {per_update} sequences per update"
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
    """The name of `step`'s row in a ConversionPlan (step 1 never checkpoints: its graphs are the
    mixers' alone)."""
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
    global_batch: int, world_size: int, peak: Callable[[int], float] | None, available: float | None
) -> BatchChoice:
    """The largest divisor of the per-process batch whose estimated peak fits `available` bytes
    (USABLE_FRACTION of it); on the CPU (`peak` None) the largest divisor up to CPU_MICRO_BATCH."""
    per_process = -(-global_batch // world_size)
    divisors = [d for d in range(per_process, 0, -1) if per_process % d == 0]
    if peak is None:
        micro = next(d for d in divisors if d <= CPU_MICRO_BATCH)
        return BatchChoice(micro, per_process // micro, None, None)
    budget = available * USABLE_FRACTION
    micro = next((d for d in divisors if peak(d) <= budget), None)
    if micro is None:
        raise ValueError(
            f"even one sequence per micro-batch is estimated at {peak(1) / GB:.1f} GB, over the "
            f"{budget / GB:.1f} GB this GPU has free to use; use --activation-checkpointing, more GPUs "
            "(--nproc) or a shorter --seq-len (see `radlads plan`)"
        )
    return BatchChoice(micro, per_process // micro, peak(micro) / GB, available / GB)


def size_step(
    cfg: StepConfig,
    step: int,
    device: torch.device,
    world_size: int,
    teacher_dir: str | Path,
    arch: str,
    **plan_options,
) -> tuple[StepConfig, BatchChoice | None]:
    """`cfg` with its micro-batch and accumulation set: as given where batch_size is set, else
    chosen for the device. The choice is None where the user gave the micro-batch."""
    if cfg.batch_size is not None:
        return cfg, None
    on_gpu = device.type == "cuda"
    peak = peak_estimator(teacher_dir, arch, step, cfg, world_size, **plan_options) if on_gpu else None
    choice = choose(cfg.global_batch_size, world_size, peak, available_bytes(device) if on_gpu else None)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(choice.describe(step, cfg, world_size))
    return dataclasses.replace(cfg, batch_size=choice.micro_batch, grad_accum=choice.grad_accum), choice
