"""What each `radlads` command does, in terms of the library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..convert.pipeline import Conversion, resolve_device
from ..data import prepare_shards
from ..teachers import resolve_teacher
from ..train.config import ConvertConfig

# Micro-batch and accumulation per teacher size (sequences of 512 tokens, one 80 GB GPU).
PRESETS: dict[str, dict[int, dict]] = {
    "cpu-smoke": {1: dict(batch_size=2, seq_len=128), 2: dict(batch_size=2, seq_len=128), 3: dict(seq_len=512)},
    "small": {1: dict(batch_size=32), 2: dict(batch_size=16, grad_accum=2), 3: dict(batch_size=1)},  # < 1B
    "medium": {1: dict(batch_size=16, grad_accum=2), 2: dict(batch_size=4, grad_accum=8), 3: dict(batch_size=1)},
    "large": {1: dict(batch_size=8, grad_accum=4), 2: dict(batch_size=2, grad_accum=16), 3: dict(batch_size=1)},
}
PRESET_NAMES = ("auto", *PRESETS)


def preset(name: str, teacher: str) -> dict[int, dict]:
    if name == "auto":
        name = _size_class(resolve_teacher(teacher))
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def _size_class(teacher_dir: Path) -> str:
    cfg = json.loads((teacher_dir / "config.json").read_text())
    layer = 4 * cfg["hidden_size"] ** 2 + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    params = cfg["num_hidden_layers"] * layer + cfg["vocab_size"] * cfg["hidden_size"]
    return "small" if params < 1e9 else "medium" if params < 10e9 else "large"


def convert(cfg: ConvertConfig, steps: tuple[int, ...], progress: bool = True) -> int:
    conversion = Conversion(cfg, progress=progress)
    out = conversion.run(steps)
    summary = conversion.summary()["steps"]
    cosines = summary.get("0", {}).get("layer_cosines")
    if cosines:
        print("step 0 layer-wise cosine (student mixer vs teacher attention output):")
        print("  " + " ".join("softmax" if c is None else f"{c:.3f}" for c in cosines))
    for k in ("1", "2", "3"):
        if k in summary and summary[k].get("complete"):
            s = summary[k]
            print(f"step {k}: {s['tokens']} tokens, loss {s['first_loss']:.4g} -> {s['last_loss']:.4g}, "
                  f"held-out {_fmt(s.get('heldout_start'))} -> {_fmt(s.get('heldout_end'))}")
    print(f"student written to {out}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def prepare_data(args: argparse.Namespace) -> int:
    tokenizer = AutoTokenizer.from_pretrained(resolve_teacher(args.teacher))
    index = prepare_shards(args.data, tokenizer, args.out, held_out_fraction=args.held_out_fraction)
    splits = ", ".join(f"{name}: {s.tokens} tokens in {s.documents} documents" for name, s in index.splits.items())
    print(f"shards written to {args.out} ({splits})")
    return 0


def generate(args: argparse.Namespace) -> int:
    import radlads  # noqa: F401  (registers the student architecture with the Auto classes)

    device = resolve_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, **sampling)
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0
