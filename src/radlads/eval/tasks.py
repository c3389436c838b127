"""Zero-shot tasks in lm-evaluation-harness' local JSONL shapes, turned into scored requests.

Each builder reproduces the harness' prompt for the task (doc_to_text / doc_to_choice /
doc_to_target with target_delimiter " "), so numbers are comparable with `lm_eval` runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .scoring import Request, cloze_metrics, multiple_choice_metrics, score_requests

# Eight synthetic items per task, in the harness' shapes: for tests of the task code. One item moves
# a score by 0.125, so scores on them are never a result.
SAMPLES_DIR = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class Doc:
    requests: tuple[Request, ...]  # one per choice; a single one for cloze tasks
    gold: int
    choice_lengths: tuple[int, ...]  # acc_norm denominators: characters, as in the harness


@dataclass(frozen=True)
class Task:
    build: Callable[[dict], Doc]
    metrics: tuple[str, ...]  # the metrics the harness reports for this task
    headline: str  # the metric that enters the average zero-shot score
    cloze: bool = False  # one continuation per doc (LAMBADA) instead of a choice among several


def _choices_doc(context: str, choices: Sequence[str], gold: int) -> Doc:
    return Doc(
        requests=tuple(Request(context, " " + choice) for choice in choices),
        gold=gold,
        choice_lengths=tuple(len(choice) for choice in choices),
    )


def _hellaswag_clean(text: str) -> str:
    # The bracketed tags are WikiHow artifacts; the harness strips them the same way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def build_hellaswag(row: dict) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return _choices_doc(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def build_arc(row: dict) -> Doc:
    choices = row["choices"]
    gold = choices["label"].index(row["answerKey"])
    return _choices_doc(f"Question: {row['question']}\nAnswer:", choices["text"], gold)


def build_piqa(row: dict) -> Doc:
    return _choices_doc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def build_sciq(row: dict) -> Doc:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _choices_doc(context, choices, 3)


def build_winogrande(row: dict) -> Doc:
    # Partial evaluation: the option fills the blank inside the context, and both choices are scored
    # on the same suffix, so only how well each option predicts the rest of the sentence counts.
    blank = row["sentence"].index("_")
    contexts = [row["sentence"][:blank] + row[key] for key in ("option1", "option2")]
    suffix = " " + row["sentence"][blank + 1 :].strip()
    return Doc(
        requests=tuple(Request(context, suffix) for context in contexts),
        gold=int(row["answer"]) - 1,
        choice_lengths=tuple(len(context) for context in contexts),
    )


def build_lambada(row: dict) -> Doc:
    *context, last = row["text"].split(" ")
    return Doc(requests=(Request(" ".join(context), " " + last),), gold=0, choice_lengths=(len(last),))


_MC = ("acc", "acc_norm")
TASKS: dict[str, Task] = {
    "arc_challenge": Task(build_arc, _MC, headline="acc_norm"),
    "arc_easy": Task(build_arc, _MC, headline="acc"),
    "hellaswag": Task(build_hellaswag, _MC, headline="acc_norm"),
    "lambada_openai": Task(build_lambada, ("acc", "perplexity"), headline="acc", cloze=True),
    "piqa": Task(build_piqa, _MC, headline="acc"),
    "sciq": Task(build_sciq, _MC, headline="acc"),
    "winogrande": Task(build_winogrande, ("acc",), headline="acc"),
}


def is_bundled_samples(task_dir: str | Path | None) -> bool:
    return task_dir is not None and Path(task_dir).resolve() == SAMPLES_DIR.resolve()


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_docs(task: str, path: str | Path, limit: int | None = None) -> list[Doc]:
    return [TASKS[task].build(row) for row in read_jsonl(path, limit)]


def task_files(task_dir: str | Path, tasks: Iterable[str] | None = None) -> dict[str, Path]:
    """`<task_dir>/<task>.jsonl` for the requested tasks (default: every registered task present)."""
    task_dir = Path(task_dir)
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    files = {name: task_dir / f"{name}.jsonl" for name in names}
    present = {name: path for name, path in files.items() if path.is_file()}
    missing = sorted(set(files) - set(present))
    if not present or (tasks is not None and missing):
        expected = ", ".join(f"{name}.jsonl" for name in (missing or names))
        raise FileNotFoundError(f"no task file for {missing or names} in {task_dir}; expected: {expected}")
    return present


def score_docs(
    model, tokenizer, task: Task, docs: Sequence[Doc], *, batch_size: int = 16, progress: bool = False
) -> dict[str, float]:
    """The task's metrics over `docs`, all requests scored in one sorted, batched pass."""
    requests = [request for doc in docs for request in doc.requests]
    results = iter(score_requests(model, tokenizer, requests, batch_size=batch_size, progress=progress))
    per_doc = [[next(results) for _ in doc.requests] for doc in docs]
    if task.cloze:
        metrics = cloze_metrics([doc_results[0] for doc_results in per_doc])
    else:
        metrics = multiple_choice_metrics(
            [[r.value for r in doc_results] for doc_results in per_doc],
            [doc.gold for doc in docs],
            [doc.choice_lengths for doc in docs],
        )
    return {name: metrics[name] for name in task.metrics}


def evaluate_tasks(
    model,
    tokenizer,
    task_dir: str | Path,
    tasks: Iterable[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot scores, `{task: {metric: value}}`, for each `<task_dir>/<task>.jsonl` present."""
    scores = {}
    for name, path in task_files(task_dir, tasks).items():
        docs = load_docs(name, path, limit)
        scores[name] = score_docs(
            model, tokenizer, TASKS[name], docs, batch_size=batch_size, progress=progress
        )
    return scores
