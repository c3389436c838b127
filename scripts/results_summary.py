"""Summarise real-teacher conversions packed by scripts/device_convert.sh into a results page's
figures: summary.json (one object per evaluated student), a markdown table, and two plots.

    python3 scripts/results_summary.py RESULTS_DIR OUT_DIR [--best NAME:LABEL]

RESULTS_DIR holds one folder per run (results-<label>.json, radlads.json, metrics.jsonl). GPU
minutes are the training steps' wall time from radlads.json (tokenization and evaluation left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BUCKETS = ((0, 63), (64, 255), (256, 511), (512, 1023), (1024, 2047))


def bucket_means(loss_by_position: list[float]) -> dict[str, float]:
    """Mean NLL per position bucket; position p predicts token p + 1 (the last bucket ends at 2046)."""
    losses = np.asarray(loss_by_position)
    return {f"{a}-{b}": float(losses[a : b + 1].mean()) for a, b in BUCKETS if a < len(losses)}


def passkey_rates(records: list[dict]) -> dict[int, float]:
    by_length: dict[int, list[bool]] = {}
    for r in records:
        by_length.setdefault(r["length"], []).append(r["correct"])
    return {length: sum(v) / len(v) for length, v in sorted(by_length.items())}


def trained_steps(summary: dict, label: str) -> dict[str, dict]:
    """The training steps behind the student evaluated under `label` (step2: before step 3)."""
    last = 2 if label == "step2" else 3
    return {k: v for k, v in summary["steps"].items() if 0 < int(k) <= last and "tokens" in v}


def entry(run: Path, label: str) -> dict:
    results = json.loads((run / f"results-{label}.json").read_text())
    summary = json.loads((run / "radlads.json").read_text())
    student, teacher = results["student"], results["teacher"]
    s_buckets = bucket_means(student["perplexity"]["loss_by_position"])
    t_buckets = bucket_means(teacher["perplexity"]["loss_by_position"])
    s_keys = passkey_rates(student.get("passkey", {}).get("records", []))
    t_keys = passkey_rates(teacher.get("passkey", {}).get("records", []))
    softmax = summary["config"]["student"].get("softmax_layers") or []
    steps = trained_steps(summary, label)
    return {
        "name": f"{run.name}:{label}",
        "arch": summary["arch"] + (f" + softmax layers {softmax}" if softmax else ""),
        "tokens": {k: v["tokens"] for k, v in steps.items()},
        "ppl_student": student["perplexity"]["ppl"],
        "ppl_teacher": teacher["perplexity"]["ppl"],
        "nll_student_by_position": s_buckets,
        "nll_teacher_by_position": t_buckets,
        "nll_gap_1024_2047": s_buckets["1024-2047"] - t_buckets["1024-2047"],
        "passkey": {f"{n // 1000}k": [s_keys[n], t_keys.get(n)] for n in s_keys},
        "gpu_minutes": sum(v["wall_s"] for v in steps.values()) / 60,
        "best": False,
    }


def table(entries: list[dict]) -> str:
    lines = [
        "| run | tokens (step 1 / 2 / 3) | ppl student / teacher | teacher/student | NLL gap 1024-2047 | passkey 1k / 4k / 8k (teacher) | GPU min |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for e in entries:
        tokens = " / ".join(f"{e['tokens'].get(k, 0) / 1e6:.0f}M" for k in ("1", "2", "3"))
        keys = " / ".join(f"{s:.1f} ({t:.1f})" for s, t in e["passkey"].values())
        minutes = f"{e['gpu_minutes']:.1f}"
        lines.append(
            f"| {e['name']}{' **best**' if e['best'] else ''} | {tokens} | {e['ppl_student']:.2f} / "
            f"{e['ppl_teacher']:.2f} | {e['ppl_teacher'] / e['ppl_student']:.3f} | "
            f"{e['nll_gap_1024_2047']:+.3f} | {keys} | {minutes} |"
        )
    return "\n".join(lines)


def plot_positions(results_dir: Path, entries: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    teacher_drawn = False
    for e in entries:
        run, label = e["name"].split(":")
        results = json.loads((results_dir / run / f"results-{label}.json").read_text())
        for who in ("student", "teacher"):
            if who == "teacher" and teacher_drawn:
                continue
            losses = np.asarray(results[who]["perplexity"]["loss_by_position"])
            smooth = np.convolve(losses, np.ones(32) / 32, mode="valid")
            style = dict(color="black", lw=2) if who == "teacher" else {}
            ax.plot(
                np.arange(len(smooth)) + 16,
                smooth,
                label="teacher" if who == "teacher" else e["name"],
                **style,
            )
        teacher_drawn = True
    ax.set_xscale("log")
    ax.set_xlabel("position in the 2048-token window")
    ax.set_ylabel("NLL (nats), 32-position mean")
    ax.set_title("Held-out NLL by position: students vs SmolLM2-135M-Instruct")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_scaling(entries: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for arch in sorted({e["arch"] for e in entries}):
        mine = sorted((e for e in entries if e["arch"] == arch), key=lambda e: sum(e["tokens"].values()))
        tokens = [sum(e["tokens"].values()) / 1e6 for e in mine]
        axes[0].plot(tokens, [e["ppl_teacher"] / e["ppl_student"] for e in mine], "o-", label=arch)
        axes[1].plot(tokens, [e["nll_gap_1024_2047"] for e in mine], "o-", label=arch)
    axes[0].axhline(0.9, ls="--", color="grey")
    axes[1].axhline(0.1, ls="--", color="grey")
    axes[0].set_ylabel("teacher / student perplexity")
    axes[1].set_ylabel("NLL gap at positions 1024-2047")
    for ax in axes:
        ax.set_xlabel("total training tokens (M)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--best", help="NAME:LABEL of the recommended student")
    args = parser.parse_args()
    entries = [
        entry(run, path.stem.removeprefix("results-"))
        for run in sorted(p for p in args.results.iterdir() if p.is_dir())
        for path in sorted(run.glob("results-*.json"))
    ]
    for e in entries:
        e["best"] = e["name"] == args.best
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(entries, indent=1) + "\n")
    plot_positions(args.results, entries, args.out / "position_loss.png")
    plot_scaling(entries, args.out / "scaling.png")
    print(table(entries))


if __name__ == "__main__":
    main()
