"""`radlads demo`: convert the bundled SmolLM2-135M teacher on the bundled text, evaluate student and
teacher side by side, and end with a short summary of what happened."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ..eval.suite import EvalSettings, evaluate_conversion, load_model
from ..teachers import default_teacher_gguf, resolve_teacher
from ..train.config import ConvertConfig
from .commands import convert, preset

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "samples" / "demo-corpus.jsonl.xz"
RESULTS_PAGE = "docs/results/smollm2-135m.md"
# What a GPU conversion of this teacher gave, from RESULTS_PAGE: keep the two in step.
GPU_RESULT = (
    "On one GPU (an H200), 40M + 100M + 10M tokens of a 57M-token corpus (18 GPU-minutes) gave "
    "held-out perplexity 9.05 against the teacher's 9.72 with its layers 17 and 18 kept softmax "
    "(--softmax-layers auto:2, what convert keeps by default for small teachers), and 10.74 with every "
    "layer a time mixer"
)
PROMPT = "The LORD said unto Moses,"
# Step budgets per device. On 2 CPU cores one 512-token update takes seconds; activation
# checkpointing keeps the step-2 peak (student, AdamW state, teacher, activations) within a few GB.
BUDGETS = {
    "cpu": dict(
        step1=dict(
            tokens="8k", lr=3e-3, lr_final=1e-4, seq_len=512, batch_size=1, heldout_batches=1, log_every=2
        ),
        step2=dict(tokens="15k", lr=3e-4, seq_len=512, batch_size=1, heldout_batches=1, log_every=1),
        activation_checkpointing=True,
    ),
    "cuda": dict(
        step1=dict(tokens="20M", seq_len=512, batch_size=32),
        step2=dict(tokens="20M", lr=1e-4, seq_len=512, batch_size=16),
    ),
}
# Held-out windows scored on each model: few on a CPU, where each costs a forward of both models.
EVAL = {"cpu": dict(seq_len=512, max_windows=4, batch_size=2), "cuda": dict(seq_len=1024, max_windows=64)}
POSITION_BUCKETS = ((1, 16), (17, 64), (65, 256), (257, 1024))


def run_demo(out: Path, arch: str, device: torch.device, progress: bool = True) -> int:
    started = time.perf_counter()
    teacher = resolve_teacher(default_teacher_gguf())
    budget = BUDGETS["cuda" if device.type == "cuda" else "cpu"]
    # the student `convert` builds for this teacher by default (its two induction layers kept)
    student = preset("auto", str(teacher))[1]
    cfg = ConvertConfig.from_dict(
        dict(
            teacher=str(teacher),
            data=str(DEMO_CORPUS),
            out=str(out),
            arch=arch,
            student=student,
            device=str(device),
            step3=dict(tokens=0),
            held_out_fraction=0.05,
            **budget,
        )
    )
    convert(cfg, (0, 1, 2), progress=progress)
    settings = EvalSettings(heldout=str(out / "data"), **EVAL["cuda" if device.type == "cuda" else "cpu"])
    report = evaluate_conversion(out, teacher, out / "eval", settings, device, progress=progress)
    samples = {name: greedy_sample(path, device) for name, path in (("teacher", teacher), ("student", out))}
    print(summary(out, report, samples, time.perf_counter() - started))
    return 0


@torch.no_grad()
def greedy_sample(path: Path, device: torch.device, new_tokens: int = 24) -> str:
    model = load_model(path, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").to(device)
    generated = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def summary(out: Path, report: Path, samples: dict[str, str], wall_s: float) -> str:
    run = json.loads((out / "radlads.json").read_text())
    results = json.loads((report.parent / "results.json").read_text())
    lines = [
        "",
        f"== radlads demo: {Path(run['teacher']).name} -> {run['arch']} in {wall_s / 60:.1f} min ==",
        _shape_line(json.loads((out / "config.json").read_text())),
        *(_step_line(k, run["steps"][k]) for k in ("1", "2") if k in run["steps"]),
        "",
        "held-out text the steps never trained on:",
        *_perplexity_table(results),
        "",
        f"greedy continuation of {PROMPT!r}:",
        *(f"  {name:8}{text!r}" for name, text in samples.items()),
        "",
        f"report: {report} (plots beside it: position_loss.png, loss_curves.png)",
        f"{GPU_RESULT}: see {RESULTS_PAGE}.",
    ]
    return "\n".join(lines)


def _shape_line(config: dict) -> str:
    layers, n = config.get("softmax_layers") or [], config["num_hidden_layers"]
    if not layers:
        return f"student: all {n} layers time mixers"
    window = f", over the last {config['softmax_window']:,} tokens" if config.get("softmax_window") else ""
    kept = ", ".join(map(str, layers))
    return (
        f"student: layers {kept} kept as softmax attention{window}; the other {n - len(layers)} time mixers"
    )


def _step_line(step: str, s: dict) -> str:
    what = {"1": "attention alignment", "2": "distillation (KL)"}[step]
    return (
        f"step {step} {what}: {s['tokens']:,} tokens in {s['updates']} updates of "
        f"{s['tokens'] // max(1, s['updates']):,} tokens, {s['wall_s']:.0f} s; "
        f"held-out loss {s['heldout_start']:.4g} -> {s['heldout_end']:.4g}"
    )


def _perplexity_table(results: dict) -> list[str]:
    models = [name for name in ("teacher", "student") if results.get(name, {}).get("perplexity")]
    ppl = {name: results[name]["perplexity"] for name in models}
    loss = {name: np.asarray(ppl[name]["loss_by_position"]) for name in models}
    buckets = [
        (lo, min(hi, len(loss[models[0]]))) for lo, hi in POSITION_BUCKETS if lo <= len(loss[models[0]])
    ]
    header = f"  {'':10}{'perplexity':>11}" + "".join(f"{f'NLL @{lo}-{hi}':>14}" for lo, hi in buckets)
    rows = [
        f"  {name:10}{ppl[name]['ppl']:>11.1f}"
        + "".join(f"{loss[name][lo - 1 : hi].mean():>14.3f}" for lo, hi in buckets)
        for name in models
    ]
    return [header, *rows]
