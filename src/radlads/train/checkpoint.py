"""Resumable checkpoints: the model (HF folder, safetensors), the optimizer state (safetensors)
and the trainer/data-order state (JSON), swapped in atomically so a crash never leaves a half one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {
        f"{idx}.{key}": value.detach().cpu().contiguous()
        for idx, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: Path,
    model,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    *,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> None:
    """Write into `path.tmp`, then swap it in: `path` is always either the old or the new checkpoint.

    `model_state`/`optimizer_state` replace the model's and optimizer's own state dicts (the full
    states a sharded run gathered on rank 0)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model_state)
    optimizer_groups = None
    if optimizer is not None:
        tensors, optimizer_groups = _flatten_optimizer(optimizer_state or optimizer.state_dict())
        save_file(tensors, tmp / OPTIMIZER_FILE)
    with open(tmp / TRAINER_FILE, "w") as f:
        json.dump({**trainer_state, "optimizer_param_groups": optimizer_groups}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint at `path`, or the one a crash left at `path.old` mid-swap."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    with open(Path(path) / TRAINER_FILE) as f:
        return json.load(f)


def read_optimizer(path: Path) -> dict[str, Any]:
    """The saved optimizer state dict, keyed by parameter index as `optimizer.state_dict()`."""
    groups = read_trainer_state(path)["optimizer_param_groups"]
    return _unflatten_optimizer(load_file(Path(path) / OPTIMIZER_FILE), groups)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(read_optimizer(path))
