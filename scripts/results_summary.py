"""Summarise real-teacher conversions packed by scripts/device_convert.sh into a results page's
figures: summary.json (one object per evaluated student), a markdown table, and two plots.

    python3 scripts/results_summary.py RESULTS_DIR OUT_DIR [--best NAME:LABEL] [--positions NAME:LABEL,...]

RESULTS_DIR holds one folder per run (results-<label>.json, radlads.json, metrics.jsonl). GPU
minutes are the training steps' wall time from radlads.json (tokenization and evaluation left out).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from radlads.convert.presets import PRESETS  # noqa: E402

BUCKETS = ((0, 63), (64, 255), (256, 511), (512, 1023), (1024, 2047))
# Every run here but one distilled at the small-teacher recipe's step-2 length; a series names any other.
STEP2_SEQ_LEN = PRESETS["small"][2]["seq_len"]


def bucket_means(loss_by_position: list[float]) -> dict[str, float]:
    """Mean NLL per position bucket; position p predicts token p + 1 (the last bucket ends at 2046)."""
    losses = np.asarray(loss_by_position)
    return {f"{a}-{b}": float(losses[a : b + 1].mean()) for a, b in BUCKETS if a < len(losses)}


def passkey_rates(records: list[dict]) -> dict[int, float]:
    by_length: dict[int, list[bool]] = {}
    for r in records:
        by_length.setdefault(r["length"], []).append(r["correct"])
    return {length: sum(v) / len(v) for length, v in sorted(by_length.items())}


def length_label(tokens: int) -> str:
    return f"{tokens / 1000:g}k" if tokens >= 1000 else str(tokens)


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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
    window = summary["config"]["student"].get("softmax_window")
    sinks = summary["config"]["student"].get("softmax_sinks", 4)
    over = f" over a window of {window} + {sinks} sinks" if window else ""
    steps = trained_steps(summary, label)
    # Older runs' radlads.json predate the knob: their step 2 trained everything at one LR.
    new_lr_scale = summary["config"]["step2"].get("new_lr_scale", 1.0)
    repeat_fraction = summary["config"]["step2"].get("repeat_fraction", 0.0)
    return {
        "name": f"{run.name}:{label}",
        "arch": summary["arch"] + (f" + softmax layers {softmax}{over}" if softmax else ""),
        "tokens": {k: v["tokens"] for k, v in steps.items()},
        "step2_new_lr_scale": new_lr_scale,
        "step2_repeat_fraction": repeat_fraction,
        "step2_seq_len": summary["config"]["step2"]["seq_len"],
        "ppl_student": student["perplexity"]["ppl"],
        "ppl_teacher": teacher["perplexity"]["ppl"],
        "nll_student_by_position": s_buckets,
        "nll_teacher_by_position": t_buckets,
        "nll_gap_1024_2047": s_buckets["1024-2047"] - t_buckets["1024-2047"],
        "passkey": {length_label(n): [s_keys[n], t_keys.get(n)] for n in s_keys},
        "gpu_minutes": sum(v["wall_s"] for v in steps.values()) / 60,
        "best": False,
    } | hardware(steps)


def hardware(steps: dict[str, dict]) -> dict:
    """What the steps ran on, as each recorded it (runs from before that record have no key)."""
    names = sorted({v["hardware"] for v in steps.values() if "hardware" in v})
    return {"hardware": names} if names else {}


def table(entries: list[dict]) -> str:
    lines = [
        "| run | tokens (step 1 / 2 / 3) | ppl student / teacher | teacher/student | NLL gap 1024-2047 | passkey by length: student (teacher) | GPU min |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for e in entries:
        tokens = " / ".join(f"{e['tokens'].get(k, 0) / 1e6:.0f}M" for k in ("1", "2", "3"))
        keys = " / ".join(f"{n}: {s:.1f} ({rate(t)})" for n, (s, t) in e["passkey"].items())
        minutes = f"{e['gpu_minutes']:.1f}"
        lines.append(
            f"| {e['name']}{' **best**' if e['best'] else ''} | {tokens} | {e['ppl_student']:.2f} / "
            f"{e['ppl_teacher']:.2f} | {e['ppl_teacher'] / e['ppl_student']:.3f} | "
            f"{e['nll_gap_1024_2047']:+.3f} | {keys} | {minutes} |"
        )
    return "\n".join(lines)


def smoothed(losses: list[float], width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(positions, NLL) as a running mean over `width` positions, centred."""
    curve = np.convolve(np.asarray(losses), np.ones(width) / width, mode="valid")
    return np.arange(len(curve)) + width // 2, curve


def plot_positions(results_dir: Path, entries: list[dict], out: Path) -> None:
    """NLL by position (left) and student minus teacher (right). Runs scored on other held-out
    windows (another corpus build) have another teacher curve; the difference compares them."""
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4))
    teachers: dict[float, list[float]] = {}
    for e in entries:
        run, label = e["name"].split(":")
        results = json.loads((results_dir / run / f"results-{label}.json").read_text())
        student = results["student"]["perplexity"]["loss_by_position"]
        teacher = results["teacher"]["perplexity"]["loss_by_position"]
        teachers.setdefault(round(e["ppl_teacher"], 2), teacher)
        (line,) = ax.plot(*smoothed(student), label=e["name"], lw=2.5 if e["best"] else 1.2)
        x, diff = smoothed(np.asarray(student) - np.asarray(teacher))
        gap.plot(x, diff, color=line.get_color(), label=e["name"], lw=2.5 if e["best"] else 1.2)
    for (ppl, losses), style in zip(sorted(teachers.items()), itertools.cycle(("-", "--", ":", "-."))):
        ax.plot(
            *smoothed(losses), color="black", ls=style, lw=2, label=f"teacher (ppl {ppl:.2f} on its windows)"
        )
    gap.axhline(0, color="black", lw=1)
    for a in (ax, gap):
        a.set_xscale("log")
        a.set_xlabel("position in the 2048-token window")
    ax.set_ylabel("NLL (nats), 32-position mean")
    gap.set_ylabel("student NLL minus teacher NLL (nats)")
    ax.set_title("Held-out NLL by position")
    gap.set_title("Gap to the teacher on the same windows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_scaling(entries: list[dict], out: Path) -> None:
    """One line per student and recipe (with or without step 3), against total tokens."""
    series: dict[str, list[dict]] = {}
    for e in entries:
        recipe = "steps 1-3" if "3" in e["tokens"] else "steps 1-2"
        if e["step2_new_lr_scale"] != 1:
            recipe += f", new parameters at {e['step2_new_lr_scale']:g}x LR in step 2"
        if e["step2_seq_len"] != STEP2_SEQ_LEN:
            recipe += f", step 2 at {e['step2_seq_len']} tokens"
        if e["step2_repeat_fraction"]:
            recipe += f", spans repeated in {e['step2_repeat_fraction']:.0%} of windows"
        series.setdefault(f"{e['arch']}, {recipe}", []).append(e)
    # One legend line per series, below both panels: the figure grows with the legend.
    legend_in = 0.16 * (len(series) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2 + legend_in))
    colors = plt.get_cmap("tab20").colors  # the default cycle repeats after 10 series
    for (name, mine), color in zip(sorted(series.items()), itertools.cycle(colors[::2] + colors[1::2])):
        mine.sort(key=lambda e: sum(e["tokens"].values()))
        tokens = [sum(e["tokens"].values()) / 1e6 for e in mine]
        axes[0].plot(
            tokens, [e["ppl_teacher"] / e["ppl_student"] for e in mine], "o-", color=color, label=name
        )
        axes[1].plot(tokens, [e["nll_gap_1024_2047"] for e in mine], "o-", color=color, label=name)
    axes[0].axhline(0.9, ls="--", color="grey", label="target")
    axes[1].axhline(0.1, ls="--", color="grey", label="target")
    axes[0].set_ylabel("teacher / student perplexity")
    axes[1].set_ylabel("NLL gap at positions 1024-2047 (nats)")
    ticks: list[int] = []
    for t in sorted({round(sum(e["tokens"].values()) / 1e6) for e in entries}, reverse=True):
        if not ticks or 1.15 * t < ticks[-1]:  # labels closer than that would overprint
            ticks.append(t)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.minorticks_off()
        ax.set_xlabel("total training tokens (M)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (legend_in + 0.1) / (4.2 + legend_in), 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--best", help="NAME:LABEL of the recommended student")
    parser.add_argument(
        "--positions", help="comma-separated NAME:LABELs to draw in the position figure (default: all)"
    )
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
    drawn = set(args.positions.split(",")) if args.positions else {e["name"] for e in entries}
    if missing := drawn - {e["name"] for e in entries}:
        parser.error(f"--positions names runs that have no results: {', '.join(sorted(missing))}")
    plot_positions(args.results, [e for e in entries if e["name"] in drawn], args.out / "position_loss.png")
    plot_scaling(entries, args.out / "scaling.png")
    print(table(entries))


if __name__ == "__main__":
    main()
