"""One training loop for the three protocol steps. A step supplies its objective (which
parameters train and the loss of a batch); the loop owns optimisation, schedule, logging,
checkpoints and resume."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .checkpoint import find_checkpoint, load_resumable, read_trainer_state, save_model, save_resumable
from .config import StepConfig
from .distributed import Distributed
from .metrics import MetricsLog
from .optimizers import DEFAULT as DEFAULT_OPTIMIZER
from .optimizers import build_optimizer, param_groups, resolve_optimizer, set_lr

logger = logging.getLogger(__name__)


class Objective(Protocol):
    step: int
    name: str

    def trainable(self, student: nn.Module) -> list[nn.Parameter]: ...

    def loss(self, student: nn.Module, batch: Tensor) -> Tensor: ...


class TrainingDiverged(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    pass


def learning_rate(cfg: StepConfig, tokens: int) -> float:
    """Linear warm-up, then flat (lr_final None) or cosine from lr to lr_final over the budget."""
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        return cfg.lr * (tokens + 1) / cfg.warmup_tokens
    if cfg.lr_final is None:
        return cfg.lr
    progress = min(1.0, (tokens - cfg.warmup_tokens) / max(1, cfg.tokens - cfg.warmup_tokens))
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    step: int
    tokens: int
    updates: int
    first_loss: float
    last_loss: float
    heldout_start: float | None
    heldout_end: float | None
    wall_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Window:
    """Tokens of the updates finished since the last log, and the wall time since (`restart`
    leaves checkpoints out)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self, finished: float) -> float:
        """Tokens per second from the window's start to `finished`, when the last update counted
        finished; the next window starts there."""
        rate = self.tokens / (finished - self.start)
        self.tokens, self.start = 0, finished
        return rate


class Trainer:
    def __init__(
        self,
        objective: Objective,
        student: nn.Module,
        cfg: StepConfig,
        loader,
        heldout_batches: list[Tensor],
        checkpoint_dir: Path | None,
        metrics: MetricsLog | None,
        device: torch.device,
        progress: bool = True,
        dist: Distributed | None = None,
        compiled: bool = False,
    ):
        # Under torchrun the loader yields this rank's part of each global batch, the student is
        # sharded here (the teacher by the caller), and only rank 0 logs.
        # The loader, held-out batches, checkpoint folder and metrics serve `run` only:
        # `train_step` alone may go without them. `compiled`: the student's layers are
        # torch.compile'd, which changes how the held-out batches are scored (heldout_loss).
        self.objective, self.student, self.cfg = objective, student, cfg
        self.compiled = compiled
        self.loader, self.heldout = loader, heldout_batches
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.metrics = metrics
        self.device, self.dist = device, dist or Distributed(device=device)
        self.progress = progress and self.dist.is_main
        self.tokens_per_update = cfg.tokens_per_update * self.dist.world_size
        self.micro_batch = cfg.batch_size  # halved where an update runs out of memory
        student.requires_grad_(False)
        for p in objective.trainable(student):  # unties the embeddings (steps 2-3) before sharding
            p.requires_grad_(True)
        self.loss = self.dist.shard_student(student, objective.step, objective.loss)
        self.params = objective.trainable(student)  # again: sharding replaced them with DTensors
        self.optimizer_name = resolve_optimizer(cfg.optimizer)
        # A student that says which parameters are new (RadladsForCausalLM) may train them faster.
        new = student.new_parameters() if hasattr(student, "new_parameters") else []
        groups = param_groups(self.params, new, cfg.new_lr_scale, cfg.weight_decay)
        self.optimizer = build_optimizer(self.optimizer_name, groups, cfg)

    def autocast(self):
        # bf16 activations on GPU with fp32 master weights: an LR of 1e-5 would vanish in bf16 weights.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def heldout_loss(self) -> float | None:
        if not self.heldout:
            return None
        if self.compiled:
            return self._heldout_through_training_graphs()
        self.student.eval()
        with torch.no_grad(), self.autocast():
            losses = [self.loss(b.to(self.device)).float() for b in self.heldout]
        self.student.train()
        return self.dist.mean(torch.stack(losses).mean()).item()

    def _heldout_through_training_graphs(self) -> float:
        """The held-out loss as training computes it: train mode, autograd on, micro-batches of
        the update's size. In eval mode or under no_grad, torch.compile would build and compile a
        second version of every compiled layer and loss, in every step. Each loss is detached at
        once, so no batch's activations outlive its forward."""
        losses = []
        for batch in self.heldout:
            batch = batch.to(self.device)
            with self.autocast():
                parts = [
                    self.loss(part).detach().float() * len(part) for part in batch.split(self.micro_batch)
                ]
            losses.append(torch.stack(parts).sum() / len(batch))
        return self.dist.mean(torch.stack(losses).mean()).item()

    def _batches(self) -> Iterator[Tensor]:
        for batch in self.loader:
            yield batch.to(self.device, non_blocking=True)

    def run(self) -> StepResult:
        cfg, step = self.cfg, self.objective.step
        if self.device.type == "cuda":  # the logged peak memory is this step's
            torch.cuda.reset_peak_memory_stats(self.device)
        state = self._resume()
        # The step's wall time counts its held-out scoring too: with compiled layers the first
        # held-out batch compiles the training graphs.
        started = time.perf_counter() - state.get("wall_s", 0.0)  # a resumed step's clock goes on
        tokens, updates = state.get("tokens", 0), state.get("updates", 0)
        first_loss, last_loss = state.get("first_loss"), state.get("last_loss")
        heldout_start = state["heldout_start"] if "heldout_start" in state else self.heldout_loss()
        next_checkpoint = (tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        bar = tqdm(
            total=cfg.tokens,
            initial=tokens,
            unit="tok",
            unit_scale=True,
            desc=f"step {step} ({self.objective.name})",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        batches = self._batches()
        window = _Window()  # training since the last log (no checkpoints, no evaluation)
        self.student.train()
        queued: list[tuple[int, int, float, Tensor, float | None]] = []  # losses still on the device
        # When an update finished: on a CPU, when train_step returned; on a GPU, when reading its
        # loss returned. A CPU's last update is read just after the one before it, whose time it was.
        synchronous = self.device.type == "cpu"
        while tokens < cfg.tokens:
            lr = learning_rate(cfg, tokens)
            loss = self.train_step(batches, lr)
            tokens, updates = tokens + self.tokens_per_update, updates + 1
            queued.append((tokens, updates, lr, loss, time.perf_counter() if synchronous else None))
            checkpoint = next_checkpoint <= tokens < cfg.tokens
            # Each loss is read once the next update is queued behind it: read at once, the GPU
            # would idle at every update's start while the host launched its first kernels.
            # Before a checkpoint and at the end, every loss is read.
            while len(queued) > (0 if checkpoint or tokens >= cfg.tokens else 1):
                done_tokens, done_updates, done_lr, done_loss, finished = queued.pop(0)
                value = self._read_loss(done_loss, done_tokens)
                finished = time.perf_counter() if finished is None else finished
                first_loss = value if first_loss is None else first_loss
                last_loss = value
                window.add(self.tokens_per_update)
                bar.update(self.tokens_per_update)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                if done_updates % cfg.log_every == 0 or done_tokens >= cfg.tokens:
                    record = dict(
                        step=step,
                        tokens=done_tokens,
                        loss=value,
                        lr=done_lr,
                        micro_batch=self.micro_batch,
                        optimizer=self.optimizer_name,
                    )
                    # elapsed_s shows where a step's time went: compiling, checkpoints, held-out scoring.
                    self._log(
                        {**record, "tokens_per_s": window.rate(finished), "elapsed_s": finished - started}
                    )
            if checkpoint:
                self._save(
                    dict(
                        tokens=tokens,
                        updates=updates,
                        first_loss=first_loss,
                        last_loss=last_loss,
                        heldout_start=heldout_start,
                        complete=False,
                        wall_s=time.perf_counter() - started,
                    )
                )
                next_checkpoint += cfg.checkpoint_every
                window.restart()
        bar.close()
        result = StepResult(
            step,
            tokens,
            updates,
            first_loss,
            last_loss,
            heldout_start,
            self.heldout_loss(),
            time.perf_counter() - started,
        )
        self._save({**result.to_dict(), "complete": True, "hardware": self.hardware()})
        return result

    def hardware(self) -> str:
        """What the step ran on, recorded beside its wall time ("1 x NVIDIA H100 80GB HBM3");
        a step resumed elsewhere records where it finished."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.dist.world_size} x {name}"

    def _read_loss(self, loss: Tensor, tokens: int) -> float:
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"step {self.objective.step}: the loss became {value} after {tokens} tokens. The last good "
                f"checkpoint is kept in {self.checkpoint_dir}; lower the learning rate (now {self.cfg.lr}) "
                "or check the data, then re-run."
            )
        return value

    def train_step(self, batches: Iterator[Tensor], lr: float) -> Tensor:
        """One optimizer update at learning rate `lr` from the next batch of `batches` (this
        process's sequences of the update), run as micro-batches of `micro_batch` sequences;
        returns the mean loss, on the device: reading it waits for the update to finish (`run`
        reads it once the next update is queued). bench/training.py times this method as `run`
        calls it: keep `run`'s work in it.

        A forward or backward that runs out of GPU memory is run again from the same batch with
        half the micro-batch (one process only: under torchrun the other ranks would wait in a
        collective), so nothing is lost but the time of the failed try. The optimizer's step is not
        retried: it may have updated some parameter groups before it ran out, and its memory does
        not depend on the micro-batch."""
        batch = next(batches)
        while True:
            try:
                total, finite = self._gradients(batch)
                break
            except torch.OutOfMemoryError:
                if self.micro_batch == 1 or self.dist.enabled:
                    raise
            # Out of the except block, so that the error's frames (and the tensors they hold) are gone.
            self._retry_smaller()
        self._step(lr, finite)
        return total

    def _retry_smaller(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.micro_batch = max(1, self.micro_batch // 2)
        logger.warning(
            "step %d: an update ran out of memory; running it again with micro-batches of %d sequences",
            self.objective.step,
            self.micro_batch,
        )

    def _gradients(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's mean loss and whether it and the clipped gradients are finite, both on the
        device, with the gradients accumulated in the parameters."""
        # Summed on the device and read once per update: a read per micro-batch would stall the
        # host until the GPU drains, leaving the GPU idle while the next micro-batch is launched.
        total = torch.zeros((), device=self.device)
        for part in batch.split(self.micro_batch):
            with self.autocast():
                loss = self.loss(part) * (len(part) / len(batch))
            loss.backward()
            total += loss.detach()
        total = self.dist.mean(total)  # every rank decides on the same values below
        finite = torch.isfinite(total)
        if self.cfg.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
            # A finite loss can still come with an inf or NaN gradient (clip 0: unchecked).
            finite &= torch.isfinite(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        return total, finite

    def _step(self, lr: float, finite: Tensor) -> None:
        """The optimizer's update at `lr` (times each group's scale), skipped where not `finite`."""
        set_lr(self.optimizer, lr)
        if self.optimizer.defaults.get("fused"):
            # The fused kernels skip a non-finite update on the device, so the loss is read after
            # the optimizer's kernels are queued: reading it first would leave the GPU idle while
            # the host launched them.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif finite.item():  # others (torchao's, the benchmark's baseline): a wait on the GPU per update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, record: dict) -> None:
        """Log on rank 0; on CUDA add every rank's peak memory in this step so far (collectives:
        every rank calls this): what tensors held, and what the allocator held for them, whose
        difference (fragmentation) convert.batching's margin must cover."""
        if self.device.type == "cuda":
            for name, peak in (
                ("allocated", torch.cuda.max_memory_allocated),
                ("reserved", torch.cuda.max_memory_reserved),
            ):
                record[f"max_memory_{name}_gb"] = self.dist.gather(peak(self.device) / 1e9)
        if self.dist.is_main:
            self.metrics.log(record)

    def _save(self, state: dict) -> None:
        """A finished step as a Hugging Face folder, a mid-step checkpoint as sharded DCP state."""
        state = {
            **state,
            "step": self.objective.step,
            "optimizer": self.optimizer_name,
            "lr_scales": [group["lr_scale"] for group in self.optimizer.param_groups],
            "loader": self.loader.state_dict(),
        }
        try:
            if state["complete"]:
                save_model(self.checkpoint_dir, self.student, state, self.dist)
            else:
                save_resumable(self.checkpoint_dir, self.student, self.optimizer, state, self.dist)
        except OSError as err:  # a full disk, a quota: the swap never happened, the old one stands
            raise CheckpointWriteError(self._unwritten(state, err)) from None

    def _unwritten(self, state: dict, err: OSError) -> str:
        what = (
            f"step {self.objective.step}: could not write its checkpoint at {state['tokens']} tokens ({err})"
        )
        found = find_checkpoint(self.checkpoint_dir)
        if found is None:
            return (
                f"{what}; no earlier checkpoint of this step exists: free space and re-run to start it again"
            )
        return (
            f"{what}; the last good checkpoint is intact in {found} ({read_trainer_state(found)['tokens']} "
            "tokens): free space and re-run the same command to resume from it"
        )

    def _resume(self) -> dict:
        found = find_checkpoint(self.checkpoint_dir)
        if found is None:  # a fresh start: forget what a run killed before its first checkpoint logged
            if self.dist.is_main:
                self.metrics.forget_after(self.objective.step, 0)
            return {}
        state = read_trainer_state(found)
        written = state.get("optimizer", DEFAULT_OPTIMIZER)  # checkpoints from before the choice
        if written != self.optimizer_name:  # one optimizer's state does not load into another's
            raise ValueError(
                f"{found} holds the state of optimizer {written}, but this run chose "
                f"{self.optimizer_name}: pass --optimizer {written} to resume it, or delete "
                f"{self.checkpoint_dir} to start step {self.objective.step} over"
            )
        scales = [group["lr_scale"] for group in self.optimizer.param_groups]
        written_scales = state.get("lr_scales", scales)  # checkpoints from before the record
        if len(written_scales) != len(scales) and set(written_scales) == set(scales):
            # the same LR scales, split by weight decay (optimizers.param_groups) or not
            raise ValueError(
                f"{found} holds the state of a step run with {'no ' if len(written_scales) < len(scales) else ''}"
                f"weight decay, which groups the parameters differently: resume step "
                f"{self.objective.step} with its weight_decay as it was, or delete {self.checkpoint_dir} to "
                f"start step {self.objective.step} over"
            )
        if len(written_scales) != len(scales):  # one group or two: the state would not load
            raise ValueError(
                f"{found} holds the state of a step whose new parameters trained at "
                f"{written_scales[-1]}x the LR, but this run asks for {scales[-1]}x: set step "
                f"{self.objective.step}'s new_lr_scale to {written_scales[-1]} to resume it, or delete "
                f"{self.checkpoint_dir} to start step {self.objective.step} over"
            )
        t0 = time.perf_counter()
        self._load_keeping_settings(found)
        self.loader.load_state_dict(state["loader"])
        if self.dist.is_main:
            self.metrics.forget_after(self.objective.step, state["tokens"])
            # A resume can take minutes (state of several GB, resharded): say where the time went.
            logger.info(
                "step %d: resumed at %d tokens from %s (loaded in %.1f s)",
                self.objective.step,
                state["tokens"],
                found,
                time.perf_counter() - t0,
            )
        return state

    def _load_keeping_settings(self, found: Path) -> None:
        """Load the model and optimizer state, then put back this run's LR scales, weight decay
        and betas, which the loaded param groups carry: the command as given applies from here on,
        as its LR schedule does (config.yaml records it)."""
        keys = ("lr_scale", "weight_decay", "betas")
        mine = [{k: group[k] for k in keys} for group in self.optimizer.param_groups]
        load_resumable(found, self.student, self.optimizer)
        changed = set()
        for group, settings in zip(self.optimizer.param_groups, mine):
            changed |= {
                f"{k} {settings[k]} (was {group[k]})" for k in keys if _plain(group[k]) != _plain(settings[k])
            }
            group.update(settings)
        if changed and self.dist.is_main:
            logger.warning("step %d: resuming with %s", self.objective.step, ", ".join(sorted(changed)))


def _plain(value):
    """A setting as comparable: a checkpoint gives betas back as a list."""
    return tuple(value) if isinstance(value, (list, tuple)) else value
