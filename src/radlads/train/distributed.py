"""Data-parallel conversion under `torchrun`: process group, FSDP2 sharding, loss averaging and
full-state checkpoints gathered on rank 0 (so a run resumes on any number of processes).

Without torchrun (WORLD_SIZE unset or 1) `Distributed.init` returns a single-process context
whose helpers are no-ops, and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # --- FSDP2 ---

    def shard_student(self, student: nn.Module, step: int) -> None:
        """fully_shard the units the step's objective calls directly (the loss functions call
        `layer.self_attn` in step 1 and `student.model` / `student.lm_head` in steps 2-3, not the
        root forward, so each of those is its own FSDP root)."""
        if not self.enabled:
            return
        if step == 1:  # only the time mixers train and run; everything else is frozen and unused
            for layer in student.model.layers:
                self._shard(layer.self_attn)
            return
        for layer in student.model.layers:
            self._shard(layer)
        self._shard(student.model)
        if student.lm_head.weight is not student.model.embed_tokens.weight:
            self._shard(student.lm_head)

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

    # --- full-state checkpoints ---

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The full model and optimizer state dicts on CPU (collective; complete on rank 0). The
        optimizer state is keyed like `optimizer.state_dict()` of one process (param index order)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=options)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:  # cpu_offload leaves the other ranks' full state dicts empty
            return {}, {}
        index = {fqn: i for i, fqn in enumerate(_fqns(model, optimizer))}
        groups, start = [], 0
        for g in optim_sd["param_groups"]:
            groups.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        state = {index[fqn]: s for fqn, s in optim_sd["state"].items()}
        return model_sd, {"state": state, "param_groups": groups}

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
        """Set a one-process (index-keyed) full optimizer state dict on the sharded optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqns = _fqns(model, optimizer)
        groups, start = [], 0
        for g in full["param_groups"]:
            groups.append({**g, "params": fqns[start : start + len(g["params"])]})
            start += len(g["params"])
        state = {fqns[int(i)]: s for i, s in full["state"].items()}
        set_optimizer_state_dict(
            model,
            optimizer,
            {"state": state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )


def _fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
