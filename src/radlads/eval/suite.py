"""`radlads eval`: the same measurements on student and teacher, then the ratio report."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data import PackedLoader, ShardIndex, check_tokenizer, iter_documents
from ..models.configuration import window_overrides
from .copying import PREFIX, SPAN, evaluate_copying
from .passkey import evaluate_passkey
from .perplexity import evaluate_perplexity
from .report import ModelResults, write_report
from .speed import bench_generate
from .tasks import evaluate_tasks

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to measure. Every part is optional; empty tuples switch a measurement off."""

    heldout: str | None = None  # shard folder (its held-out split) or text file/folder
    seq_len: int = 1024  # window length of the perplexity / per-position loss
    batch_size: int = 4
    max_windows: int = 64
    task_dir: str | None = None  # folder of <task>.jsonl files; None: no zero-shot tasks
    tasks: list[str] | None = None
    limit: int | None = None
    passkey_lengths: tuple[int, ...] = ()
    copy_distances: tuple[int, ...] = ()  # copying probes (eval.copying): tokens between span and repeat
    speed_contexts: tuple[int, ...] = ()
    speed_batch_size: int = 1
    # torch.compile a student's prefill and decoding step as its saved config says. Off by default:
    # compiling takes 1-2 min on CUDA, long beside scoring's few short generations.
    # Speed measurements keep the saved settings, the ones a user's generate() runs with.
    compile: bool = False
    # Score a hybrid student with its softmax layers over this window and these sinks, whatever
    # it was trained with: what bounding its decoding memory costs (None: as trained).
    softmax_window: int | None = None
    softmax_sinks: int | None = None

    def longest_input(self) -> int:
        """The most positions any one measurement feeds a model."""
        return max(
            self.seq_len if self.heldout else 0,
            *self.passkey_lengths,
            *(PREFIX + 2 * SPAN + d for d in self.copy_distances),
            *self.speed_contexts,
            0,
        )


def warn_past_trained_context(path: str | Path, settings: EvalSettings) -> None:
    """A measurement past the teacher's trained context scores RoPE positions neither model trained
    on: legitimate to ask for, but the teacher's side of the ratio is then no longer its best."""
    trained = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    longest = settings.longest_input()
    if trained and longest > trained:
        logger.warning(
            "measuring up to %d positions, past the teacher's trained context of %d: scores beyond "
            "it measure extrapolation, for the teacher too",
            longest,
            trained,
        )


def load_model(path: str | Path, device: torch.device, compile: bool = True, **overrides):
    """The model at `path` for scoring; compile=False turns a student's compiled prefill and
    decoding off (a plain HF teacher has no such switches); `overrides`: config fields to replace
    (models.configuration.window_overrides)."""
    import radlads  # noqa: F401  (registers the student architecture with the Auto classes)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides).to(device).eval()
    for switch in ("compile_prefill", "compile_decode"):
        if not compile and hasattr(model.config, switch):
            setattr(model.config, switch, False)
    return model


def heldout_windows(source: str, tokenizer, settings: EvalSettings) -> Iterator[torch.Tensor]:
    """[B, T] windows of held-out text: a shard folder's held-out split, or raw text tokenised here."""
    path = Path(source)
    if (path / "index.json").is_file():
        check_tokenizer(ShardIndex.load(path), tokenizer)
        # One window per loader batch: the loader's held-out pass keeps only full batches, which
        # would drop the last windows (or refuse a split of fewer than batch_size).
        loader = PackedLoader(path, settings.seq_len, 1, split="heldout")
        yield from torch.cat(list(islice(loader, settings.max_windows))).split(settings.batch_size)
        return
    tokens: list[int] = []
    for doc in iter_documents(path):
        tokens += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    usable = min(len(tokens) // settings.seq_len, settings.max_windows)
    if usable == 0:
        raise ValueError(f"{source} holds {len(tokens)} tokens: fewer than one window of {settings.seq_len}")
    windows = torch.tensor(tokens[: usable * settings.seq_len]).view(usable, settings.seq_len)
    yield from windows.split(settings.batch_size)


def evaluate_model(
    name: str, model, tokenizer, settings: EvalSettings, progress: bool = True
) -> ModelResults:
    results = ModelResults(name)
    with torch.no_grad():
        if settings.heldout:
            windows = (w.to(model.device) for w in heldout_windows(settings.heldout, tokenizer, settings))
            results.perplexity = evaluate_perplexity(model, windows, progress=progress)
        if settings.task_dir:
            results.tasks = evaluate_tasks(
                model, tokenizer, settings.task_dir, settings.tasks, settings.limit, progress=progress
            )
            results.task_dir = settings.task_dir
        if settings.passkey_lengths:
            results.passkey = evaluate_passkey(model, tokenizer, settings.passkey_lengths, progress=progress)
        if settings.copy_distances:
            results.copying = evaluate_copying(model, tokenizer, settings.copy_distances, progress=progress)
        if settings.speed_contexts:
            results.speed = bench_generate(model, settings.speed_contexts, settings.speed_batch_size)
    return results


def evaluate_conversion(
    student: str | Path,
    teacher: str | Path | None,
    out_dir: str | Path,
    settings: EvalSettings,
    device: torch.device,
    progress: bool = True,
) -> Path:
    """Evaluate student (and teacher, one at a time to bound memory); write report.md + plots."""
    tokenizer = AutoTokenizer.from_pretrained(student)
    warn_past_trained_context(student, settings)
    measured = []
    for name, path in (("student", student), ("teacher", teacher)):
        if path is None:
            measured.append(None)
            continue
        compile = settings.compile or bool(settings.speed_contexts)
        window = (settings.softmax_window, settings.softmax_sinks) if name == "student" else (None, None)
        overrides = window_overrides(path, *window)
        model = load_model(path, device, compile=compile, **overrides)
        label = f"{name}: {Path(path).name}" + "".join(f", {k} {v}" for k, v in overrides.items())
        measured.append(evaluate_model(label, model, tokenizer, settings, progress))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metrics = Path(student) / "metrics.jsonl"
    return write_report(out_dir, measured[0], measured[1], metrics if metrics.is_file() else None)
