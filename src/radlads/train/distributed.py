"""Data-parallel conversion under `torchrun`: process group, FSDP2 sharding and the few collectives
the trainer needs (loss averaging, per-rank values, the full model state for a Hugging Face folder).

Without torchrun (WORLD_SIZE unset or 1) `Distributed.init` returns a single-process context
whose helpers are no-ops, and nothing here touches torch.distributed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

ObjectiveLoss = Callable[[nn.Module, Tensor], Tensor]  # (student, batch) -> loss
LossFn = Callable[[Tensor], Tensor]  # batch -> loss


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device: torch.device) -> Distributed:
        """Join the torchrun process group (nccl on CUDA, gloo on CPU); one GPU per local rank."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=device)
        if device.type == "cuda":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:
                raise RuntimeError(
                    f"process LOCAL_RANK={local_rank} has no GPU of its own: this machine has {gpus}; "
                    f"start at most {gpus} processes per machine (--nproc / torchrun --nproc-per-node)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: Tensor) -> Tensor:
        """The mean over all ranks of a per-rank scalar tensor, on the device (no host sync)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def gather(self, value: float) -> list[float]:
        """Every rank's value of a per-rank scalar, in rank order (a collective)."""
        if not self.enabled:
            return [value]
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # --- FSDP2 ---

    def shard_student(self, student: nn.Module, step: int, loss: ObjectiveLoss) -> LossFn:
        """fully_shard the student for `step` and return the function from a batch to its loss.

        Step 1's loss calls each `layer.self_attn` (the only modules that train or run), so each
        time mixer is its own FSDP root. The step 2-3 losses call `student.model` and then use the
        LM head's weight directly (chunked KL/CE), which FSDP2 would leave sharded: there the
        decoder layers are units under one root, `_LossRoot`, whose forward is the whole loss, so
        the embeddings, final norm and LM head are all-gathered around it and their gradients
        reduce-scattered after backward."""
        if not self.enabled:
            return functools.partial(loss, student)
        if step == 1:
            for layer in student.model.layers:
                self._shard(layer.self_attn)
            return functools.partial(loss, student)
        for layer in student.model.layers:
            self._shard(layer)
        root = _LossRoot(student, loss)
        self._shard(root)
        return root

    def shard_teacher(self, teacher: nn.Module) -> None:
        """Shard the frozen teacher's decoder layers (the bulk of its memory). Its embeddings, final
        norm and (possibly tied) LM head stay replicated: the objectives call them outside the layers."""
        if not self.enabled or getattr(teacher, "_radlads_sharded", False):
            return
        for layer in teacher.model.layers:
            self._shard(layer)
        teacher._radlads_sharded = True

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if self.device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(module, **kwargs)

    def full_model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The full (unsharded) model state dict on CPU: complete on rank 0, empty on the others.
        A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _LossRoot(nn.Module):
    """An objective's loss as a module's forward, so it can be an FSDP2 root (see shard_student)."""

    def __init__(self, student: nn.Module, loss: ObjectiveLoss):
        super().__init__()
        self.student, self.loss = student, loss

    def forward(self, batch: Tensor) -> Tensor:
        return self.loss(self.student, batch)
