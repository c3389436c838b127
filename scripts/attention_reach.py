"""Where a teacher's attention looks, layer by layer: the figure behind `--softmax-layers auto:N`.

    python3 scripts/attention_reach.py TEACHER DATA OUT [--windows 3] [--seq-len 2048]

TEACHER: an HF folder or .gguf; DATA: a prepared shard folder (radlads prepare-data). Writes
OUT/attention_reach.json (per layer: weight beyond 64/256/1024 tokens, sinks left out, and the
sinks' weight; what the teacher's NLL at positions 1024 on loses when that one layer's attention
is cut to its last --window tokens and the sinks; and its strongest induction and previous-token
heads on random tokens shown twice) and OUT/attention_reach.png. Runs on the CPU in minutes for a
135M teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from radlads.convert.layer_choice import attention_reach, copy_heads  # noqa: E402
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
    p.add_argument("--window", type=int, default=64, help="local attention window of the NLL probe")
    args = p.parse_args()
    teacher = load_teacher(resolve_teacher(args.teacher))
    loader = PackedLoader(args.data, args.seq_len, 1, split="heldout")
    windows = torch.cat([batch for batch, _ in zip(loader, range(args.windows))])
    per_window = [attention_reach(teacher, w[None], DISTANCES, SINK_TOKENS) for w in windows]
    reach = {f"beyond_{d}": _mean([r.beyond[d] for r in per_window]) for d in DISTANCES}
    reach["sinks"] = _mean([r.sinks for r in per_window])
    reach[f"nll_cost_window_{args.window}"] = local_window_cost(teacher, windows, args.window)
    heads = copy_heads(teacher, teacher.config.vocab_size)
    reach["induction"], reach["previous_token"] = heads.induction, heads.previous_token
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_reach.json").write_text(
        json.dumps(
            {"teacher": args.teacher, "seq_len": args.seq_len, "windows": args.windows, **reach}, indent=1
        )
    )
    plot(reach, args.out / "attention_reach.png")


@torch.no_grad()
def local_window_cost(teacher, windows: torch.Tensor, window: int, late: int = 1024) -> list[float]:
    """Per layer: the teacher's mean NLL from position `late` on with that layer's attention cut to
    its last `window` tokens and the first SINK_TOKENS, minus the NLL with full attention."""
    T = windows.shape[1]
    q, k = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (k <= q) & ((q - k < window) | (k < SINK_TOKENS))
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]

    def local(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    def late_nll() -> float:
        logits = teacher(input_ids=windows).logits[:, late - 1 : -1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, late:]).item()

    full, costs = late_nll(), []
    for layer in teacher.model.layers:
        handle = layer.self_attn.register_forward_pre_hook(local, with_kwargs=True)
        try:
            costs.append(late_nll() - full)
        finally:
            handle.remove()
    return costs


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*rows)]


def plot(reach: dict[str, list[float]], path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, height_ratios=(3, 2))
    layers = range(len(reach["sinks"]))
    for d in DISTANCES:
        top.plot(layers, reach[f"beyond_{d}"], marker="o", label=f"beyond {d} tokens")
    top.bar(layers, reach["sinks"], color="0.85", label=f"first {SINK_TOKENS} tokens (sinks)")
    top.plot(layers, reach["induction"], "k*", markersize=9, label="induction head (random tokens, twice)")
    top.set(ylabel="attention weight\nof late queries", ylim=(0, 1))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the panel is full
    (cost,) = (k for k in reach if k.startswith("nll_cost"))
    bottom.bar(layers, reach[cost], color="tab:red")
    bottom.set(xlabel="layer", ylabel="NLL cost, nats\n(one layer local)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
