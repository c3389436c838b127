"""Where a teacher's attention looks, layer by layer: the figure behind `--softmax-layers auto:N`.

    python3 scripts/attention_reach.py TEACHER DATA OUT [--windows 3] [--seq-len 2048]

TEACHER: an HF folder or .gguf; DATA: a prepared shard folder (radlads prepare-data). Writes
OUT/attention_reach.json (per layer: weight beyond 64/256/1024 tokens, sinks left out, and the
sinks' weight) and OUT/attention_reach.png. Runs on the CPU in minutes for a 135M teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from radlads.convert.layer_choice import attention_reach  # noqa: E402
from radlads.convert.transfer import load_teacher  # noqa: E402
from radlads.data import PackedLoader  # noqa: E402
from radlads.teachers import resolve_teacher  # noqa: E402

DISTANCES = (64, 256, 1024)
SINK_TOKENS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher")
    p.add_argument("data")
    p.add_argument("out", type=Path)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    teacher = load_teacher(resolve_teacher(args.teacher))
    loader = PackedLoader(args.data, args.seq_len, 1, split="heldout")
    windows = torch.cat([batch for batch, _ in zip(loader, range(args.windows))])
    per_window = [attention_reach(teacher, w[None], DISTANCES, SINK_TOKENS) for w in windows]
    reach = {f"beyond_{d}": _mean([r.beyond[d] for r in per_window]) for d in DISTANCES}
    reach["sinks"] = _mean([r.sinks for r in per_window])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_reach.json").write_text(
        json.dumps(
            {"teacher": args.teacher, "seq_len": args.seq_len, "windows": args.windows, **reach}, indent=1
        )
    )
    plot(reach, args.out / "attention_reach.png")


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*rows)]


def plot(reach: dict[str, list[float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    layers = range(len(reach["sinks"]))
    for d in DISTANCES:
        ax.plot(layers, reach[f"beyond_{d}"], marker="o", label=f"beyond {d} tokens")
    ax.bar(layers, reach["sinks"], color="0.85", label=f"first {SINK_TOKENS} tokens (sinks)")
    ax.set(xlabel="layer", ylabel="attention weight of late queries", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
