"""The conversion report: how much of the teacher did the student keep?

Writes report.md (a student / teacher / ratio table for every metric, and the average zero-shot
ratio that the RADLADS paper headlines, from task files the user gave), results.json, and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Figure without pyplot renders with Agg and leaves the caller's global matplotlib backend alone.
from matplotlib.figure import Figure

from .copying import CopyResult
from .passkey import PasskeyResult
from .perplexity import PerplexityResult
from .tasks import TASKS, is_bundled_samples

LOWER_IS_BETTER = {"perplexity", "ppl", "nll", "peak_memory_mb"}
STEP_TITLES = {
    1: "step 1: attention alignment",
    2: "step 2: distillation (KL)",
    3: "step 3: context extension",
}


@dataclass
class ModelResults:
    """Everything measured on one model; any part may be missing."""

    name: str
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    task_dir: str | None = None  # where the task files came from
    perplexity: PerplexityResult | None = None
    passkey: PasskeyResult | None = None
    copying: CopyResult | None = None
    speed: list[dict] = field(default_factory=list)

    def flat_metrics(self) -> dict[str, float]:
        """`group/metric[@setting]` -> value, the rows of the report table."""
        out = {
            f"{task}/{name}": value for task, metrics in self.tasks.items() for name, value in metrics.items()
        }
        if self.perplexity is not None:
            out["perplexity/ppl"] = self.perplexity.ppl
            out["perplexity/nll"] = self.perplexity.nll
        if self.passkey is not None:
            out.update({f"passkey/acc@{n}": acc for n, acc in self.passkey.accuracy_by_length().items()})
        if self.copying is not None:
            # nll: on the repeated span; gain: how much lower than on its first occurrence
            for d, nll in self.copying.by_distance().items():
                out[f"copy/nll@{d}"] = nll["repeat"]
                out[f"copy/gain@{d}"] = nll["first"] - nll["repeat"]
        for row in self.speed:
            setting = f"ctx{row['context_length']}_bs{row['batch_size']}"
            for key in ("prefill_tok_s", "decode_tok_s", "peak_memory_mb"):
                if row[key] is not None:
                    out[f"speed/{key}@{setting}"] = row[key]
        return out


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1].split("@")[0] in LOWER_IS_BETTER


def _headline_metric(task: str) -> str:
    return TASKS[task].headline if task in TASKS else "acc"


def average_zero_shot(student: ModelResults, teacher: ModelResults) -> tuple[float, float, list[str]] | None:
    """(student mean, teacher mean, metrics used) over the tasks both models were scored on.

    The ratio of the two means is the paper's "fraction of the teacher's average score kept".
    None for scores on the bundled smoke samples: they are test fixtures, not a result.
    """
    if is_bundled_samples(student.task_dir) or is_bundled_samples(teacher.task_dir):
        return None
    used = [
        f"{task}/{_headline_metric(task)}"
        for task in student.tasks
        if _headline_metric(task) in student.tasks[task]
        and _headline_metric(task) in teacher.tasks.get(task, {})
    ]
    if not used:
        return None
    s, t = student.flat_metrics(), teacher.flat_metrics()
    return float(np.mean([s[m] for m in used])), float(np.mean([t[m] for m in used])), used


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def metrics_table(student: ModelResults, teacher: ModelResults | None) -> str:
    s = student.flat_metrics()
    t = teacher.flat_metrics() if teacher else {}
    lines = [
        "| metric | better | student | teacher | student/teacher | teacher/student |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for metric in [*s, *(m for m in t if m not in s)]:
        sv, tv = s.get(metric), t.get(metric)
        lower = lower_is_better(metric)
        # For lower-is-better metrics teacher/student is the "kept" fraction (1.0 = as good as teacher).
        inverse = _fmt(_ratio(tv, sv)) if lower else ""
        better = "lower ↓" if lower else "higher ↑"
        lines.append(
            f"| {metric} | {better} | {_fmt(sv)} | {_fmt(tv)} | {_fmt(_ratio(sv, tv))} | {inverse} |"
        )
    return "\n".join(lines)


NO_TASKS = (
    "No zero-shot task files were given, so this report has no zero-shot scores and no average "
    "ratio. Pass `radlads eval --tasks-dir DIR` with lm-evaluation-harness JSONL files "
    "(hellaswag.jsonl, arc_easy.jsonl, …) to score them."
)
SAMPLE_TASKS = (
    "The zero-shot rows below come from the bundled synthetic samples (8 items per task, for "
    "tests): they are not a result, and no average ratio is computed from them."
)


def _headline_section(student: ModelResults, teacher: ModelResults | None) -> str:
    if not student.tasks:
        return NO_TASKS
    if is_bundled_samples(student.task_dir):
        return SAMPLE_TASKS
    average = average_zero_shot(student, teacher) if teacher else None
    if average is None:
        return "No zero-shot task was scored on both models, so there is no average ratio."
    s_mean, t_mean, used = average
    ratio = _ratio(s_mean, t_mean)  # None where the teacher scored 0 on every task
    return (
        f"**Average zero-shot ratio (student/teacher): {'—' if ratio is None else f'{ratio:.4f}'}** "
        f"(student {s_mean:.4f}, teacher {t_mean:.4f}; mean of {', '.join(used)}, "
        f"task files from `{student.task_dir}`)."
    )


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Position ranges 0-63, 64-255, 256-1023, ... (x4 each), the last one cut at `length`."""
    buckets, lo, hi = [], 0, 64
    while lo < length:
        buckets.append((lo, min(hi, length) - 1))
        lo, hi = hi, hi * 4
    return buckets


def position_table(student: ModelResults, teacher: ModelResults | None) -> str | None:
    """Mean NLL per position range for each model, and the student's gap to the teacher: how much
    of the teacher's gain from context the student keeps, range by range."""
    if student.perplexity is None:
        return None
    rows = {student.name: np.asarray(student.perplexity.loss_by_position)}
    if teacher is not None and teacher.perplexity is not None:
        rows[teacher.name] = np.asarray(teacher.perplexity.loss_by_position)
    length = min(len(loss) for loss in rows.values())
    buckets = position_buckets(length)
    means = {name: [loss[lo : hi + 1].mean() for lo, hi in buckets] for name, loss in rows.items()}
    gap = "student − teacher"
    if len(means) == 2:
        s, t = means.values()
        means[gap] = [a - b for a, b in zip(s, t)]
    header = "| mean NLL (nats) | " + " | ".join(f"{lo}–{hi}" for lo, hi in buckets) + " |"
    lines = [header, "|---|" + "---:|" * len(buckets)]
    for name, values in means.items():
        spec = "+.3f" if name == gap else ".3f"
        lines.append(f"| {name} | " + " | ".join(format(v, spec) for v in values) + " |")
    return "\n".join(lines)


def _read_metrics(path: str | Path) -> dict[int, tuple[list[int], list[float]]]:
    curves: dict[int, tuple[list[int], list[float]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # blank, or a line a killed run cut short (train.metrics)
                continue
            if "step" in row and "loss" in row:
                tokens, losses = curves.setdefault(int(row["step"]), ([], []))
                tokens.append(row["tokens"])
                losses.append(row["loss"])
    return dict(sorted(curves.items()))


def _plot_loss_curves(metrics_jsonl: str | Path, path: Path) -> bool:
    curves = _read_metrics(metrics_jsonl)
    if not curves:
        return False
    fig = Figure(figsize=(5 * len(curves), 3.5), layout="tight")
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (step, (tokens, losses)) in zip(axes[0], curves.items(), strict=True):
        ax.plot(tokens, losses)
        if min(losses) > 0:
            ax.set_yscale("log")  # step 1 loss falls by orders of magnitude
        ax.set(title=STEP_TITLES.get(step, f"step {step}"), xlabel="tokens", ylabel="loss")
    fig.savefig(path)
    return True


def _smooth(y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Moving average; x is the number of context tokens at the window's last position."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    return np.arange(window, len(y) + 1), (c[window:] - c[:-window]) / window


def _plot_position_loss(models: list[ModelResults], path: Path) -> bool:
    curves = [(m.name, m.perplexity.loss_by_position) for m in models if m.perplexity is not None]
    if not curves:
        return False
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    for name, loss in curves:
        ax.plot(*_smooth(loss, max(1, len(loss) // 100)), label=name)
    ax.set(xlabel="context tokens", ylabel="mean next-token loss (nats)", title="loss by position")
    ax.set_xscale("log")
    ax.legend()
    fig.savefig(path)
    return True


def _plot_task_scores(models: list[ModelResults], path: Path) -> bool:
    tasks = sorted({task for m in models for task in m.tasks})
    if not tasks:
        return False
    fig = Figure(figsize=(max(5, 1.2 * len(tasks)), 4), layout="tight")
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        scores = [model.tasks.get(task, {}).get(_headline_metric(task), np.nan) for task in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, scores, width, label=model.name)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(models) - 1) / 2)
    ax.set_xticklabels([f"{task}\n{_headline_metric(task)}" for task in tasks], fontsize=8)
    ax.set(ylabel="score", ylim=(0, 1), title="zero-shot tasks")
    ax.legend()
    fig.savefig(path)
    return True


def _position_section(student: ModelResults, teacher: ModelResults | None) -> list[str]:
    table = position_table(student, teacher)
    if table is None:
        return []
    return ["## Loss by position range", "Position p predicts token p + 1 of each held-out window.", table]


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_report(
    out_dir: str | Path,
    student_results: ModelResults,
    teacher_results: ModelResults | None,
    metrics_jsonl: str | Path | None = None,
    *,
    title: str = "radlads conversion report",
) -> Path:
    """Write report.md, results.json and the plots into `out_dir`; return the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [m for m in (student_results, teacher_results) if m is not None]
    plots: list[tuple[str, str, Callable[[Path], bool]]] = [
        ("Zero-shot scores", "task_scores.png", lambda p: _plot_task_scores(models, p)),
        ("Loss by position", "position_loss.png", lambda p: _plot_position_loss(models, p)),
    ]
    if metrics_jsonl is not None:
        plots.append(("Training loss", "loss_curves.png", lambda p: _plot_loss_curves(metrics_jsonl, p)))
    made = [(caption, name) for caption, name, plot in plots if plot(out_dir / name)]

    teacher_name = teacher_results.name if teacher_results else "none"
    sections = [
        f"# {title}",
        f"Student: `{student_results.name}` — teacher: `{teacher_name}`",
        _headline_section(student_results, teacher_results),
        "## All metrics",
        "A ratio of 1.0 means the student matches the teacher. For lower-is-better metrics (↓: "
        "perplexity, nll, memory) read teacher/student: like student/teacher for the others, below "
        "1.0 means the student is worse.",
        metrics_table(student_results, teacher_results),
        *_position_section(student_results, teacher_results),
        *(f"## {caption}\n\n![{caption}]({name})" for caption, name in made),
    ]
    report = out_dir / "report.md"
    report.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    results = {"student": dataclasses.asdict(student_results)}
    if teacher_results is not None:
        results["teacher"] = dataclasses.asdict(teacher_results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable), encoding="utf-8")
    return report
