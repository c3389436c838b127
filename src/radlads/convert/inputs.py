"""Checks of a teacher folder made before anything trains, each failing with what is wrong and
what to do: weight files readable (safetensors only: no pickle is loaded from a user's folder),
shapes as config.json says, weights finite."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (the shards an index names, or the one file).

    This and stored_shapes name what is wrong, not what to do: that depends on whose folder it is (a
    teacher's is downloaded again, a conversion's is redone)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (found {', '.join(pickled)}: pickle files, which radlads does not load)" if pickled else ""
        raise FileNotFoundError(f"{folder} holds no .safetensors weights{found}")
    return files


def stored_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the files' headers (no weight is loaded)."""
    shapes = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return shapes


def _teacher_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    try:
        files = weight_files(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}; save the teacher with save_pretrained(..., safe_serialization=True) or download its "
            "safetensors files"
        ) from None
    try:
        return stored_shapes(files)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(
            f"{err}; it may be truncated or incomplete: download the teacher's weights again"
        ) from None


def check_shapes(folder: Path) -> None:
    """The shapes config.json implies, against those the weight files hold."""
    stored = _teacher_shapes(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    wrong = [
        f"{name} {list(stored[name])} (config.json implies {list(t.shape)})"
        for name, t in expected.items()
        if name in stored and stored[name] != tuple(t.shape)
    ]
    if wrong:
        raise ValueError(
            f"{folder}/config.json does not describe its weights: {'; '.join(wrong[:3])}"
            f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}; use the config.json "
            "published with these weights"
        )


def check_finite(model: nn.Module, folder: Path) -> None:
    """NaN or inf in a teacher's weights would surface hours later as a NaN loss: name them now."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(
            f"the teacher in {folder} has NaN or inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
            "its weight files are damaged or were saved from a diverged run: use another copy"
        )
