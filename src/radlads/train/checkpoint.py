"""Checkpoints, one format per purpose, each swapped in atomically so a crash never leaves a half one.

- A finished step (and step 0) is a Hugging Face model folder (config.json, model.safetensors)
  plus trainer.json: what the next step starts from and what `convert` exports. Under torchrun
  rank 0 writes it from the gathered full state.
- A mid-step checkpoint is resumable: the model and optimizer state as a
  torch.distributed.checkpoint (DCP) folder `dcp/`, which every process writes its own shards
  into, plus config.json and trainer.json (tokens, data order). DCP reshards on load, so a run
  resumes on any number of processes (2 -> 1, 1 -> 2, ...), with or without torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import write_json_atomic
from .distributed import Distributed
from .no_pickle import SafePlanner, checked_reader

TRAINER_FILE = "trainer.json"
STATE_DIR = "dcp"  # the model + optimizer shards of a mid-step checkpoint


@contextmanager
def _swapped_in(path: Path, ranks: Distributed) -> Iterator[Path]:
    """Every rank writes into the yielded `path.tmp`; rank 0 then swaps it in, so `path` is always
    either the old or the new checkpoint (a crash mid-swap leaves the old one at `path.old`)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    try:
        yield tmp
    except BaseException:
        if ranks.is_main:  # a full disk: give the space of the half-written checkpoint back
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ranks.barrier()  # every rank's part is written
    if ranks.is_main:
        if path.exists():
            _remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    ranks.barrier()  # nobody starts the next checkpoint (or reads this one) before the swap


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder, its trainer.json first: a removal cut short leaves no checkpoint."""
    (checkpoint / TRAINER_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def tidy(path: Path) -> None:
    """Remove what a kill mid-save left beside the checkpoint at `path`, once `path` itself holds one."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        for leftover in (path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp")):
            _remove(leftover)


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; here that is one of the intended uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def save_model(path: Path, model, trainer_state: dict, ranks: Distributed | None = None) -> None:
    """A finished step: the model as a Hugging Face folder, plus `trainer_state`."""
    ranks = ranks or Distributed()
    full = ranks.full_model_state(model) if ranks.enabled else None  # a collective
    with _swapped_in(path, ranks) as tmp:
        if ranks.is_main:
            model.save_pretrained(tmp, state_dict=full)
            write_json_atomic(tmp / TRAINER_FILE, trainer_state)


def save_resumable(
    path: Path, model, optimizer: torch.optim.Optimizer, trainer_state: dict, ranks: Distributed
) -> None:
    """A mid-step checkpoint: each rank writes its own shards of the model and optimizer state."""
    with _swapped_in(path, ranks) as tmp:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with _one_process_is_fine():
            dcp.save(
                {"model": model_state, "optimizer": optimizer_state},
                checkpoint_id=tmp / STATE_DIR,
                no_dist=not ranks.enabled,
            )
        if ranks.is_main:
            model.config.save_pretrained(tmp)  # so `radlads export` can rebuild the model alone
            write_json_atomic(tmp / TRAINER_FILE, trainer_state)


def is_resumable(path: Path) -> bool:
    """Whether `path` is a mid-step checkpoint (sharded state) rather than a model folder."""
    return (Path(path) / STATE_DIR / ".metadata").is_file()


def _require_resumable(path: Path) -> Path:
    if not is_resumable(path):
        raise ValueError(
            f"{path} is not a mid-step checkpoint (no {STATE_DIR}/ folder of sharded state). A finished "
            "step is not resumed, and a mid-step checkpoint of radlads before sharded (DCP) checkpoints "
            f"cannot be: delete {path} to restart that step from the previous one"
        )
    return Path(path) / STATE_DIR


def load_resumable(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a mid-step checkpoint into `model` and `optimizer`, sharded or not, whatever the number
    of processes that wrote it (every rank calls this)."""
    state_dir = _require_resumable(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_is_fine():
        dcp.load(
            state,
            storage_reader=checked_reader(state_dir),
            planner=SafePlanner(),
            no_dist=not dist.is_initialized(),
        )
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_model_state(path: Path, model: nn.Module) -> None:
    """Load only the model part of a mid-step checkpoint into an unsharded model, in one process."""
    state = {"model": model.state_dict()}
    with _one_process_is_fine():
        dcp.load(
            state,
            storage_reader=checked_reader(_require_resumable(path)),
            planner=SafePlanner(),
            no_dist=True,
        )
    model.load_state_dict(state["model"])


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint at `path`, or the one a crash left at `path.old` mid-swap."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    return None


class DamagedCheckpoint(ValueError):
    """A checkpoint's trainer state is not readable: damaged from outside radlads (its writes are atomic)."""


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        with open(Path(path) / TRAINER_FILE, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(
            f"{Path(path) / TRAINER_FILE} is damaged ({err}): delete {path} and re-run the same command "
            "to redo that step"
        ) from None
