"""Helpers of scripts/device_scale.sh (a Qwen2.5-7B-shaped `radlads convert` on one GPU): its
inputs, and the summary of the runs' metrics.jsonl as docs/bench/<shape>-one-gpu.json.

  python bench/scale.py inputs --work W [--shape qwen2.5-7b] [--train-tokens 16000000]
  python bench/scale.py summary --run W/step1 W/step2 W/step3 --out docs/bench/qwen2.5-7b-one-gpu.json
  python bench/scale.py optimizers --run W/step2-adamw W/step2-adamw-bf16-state W/step2-adamw-8bit --out F
  python bench/scale.py project --measured docs/bench/qwen2.5-7b-one-gpu.json \
      --teacher docs/plan/qwen2.5-{7b,32b,72b}.json --out docs/bench/protocol-cost-projection.json

The summary, per step (from whichever run folder logged it; a later folder wins): steady-state
tokens/s (median of the logged windows after the first --skip-logs, which hold compilation and
warm-up), MFU from the FLOPs per token that bench/training.py counts for the step at the run's
sequence length (activation checkpointing's recomputation not counted), peak memory, the
micro-batch and the optimizer the step ran with; and the GPU-hours of the whole protocol
(PROTOCOL_TOKENS) at those rates, where all three steps ran.

The optimizer comparison takes runs of one step from the same step 0 under different optimizers
(scripts/device_scale.sh with OPTIMIZERS): each one's held-out loss before and after, and its
logged training losses (one update's loss every log_every updates: the same batches in every
run) against the first run's, update by update (relative difference).

The projection carries each step's measured MFU over to other teachers: GPU-hours = protocol tokens
x that teacher's FLOPs per token (same sequence lengths) / (MFU x peak), summed over the steps, and
their price at --usd-per-gpu-hour beside the paper's published cost (under $2,000 for its 72B
conversion). It assumes the MFU holds at any size and GPU count, which nothing here has measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from common import (
    PEAK_BF16_FLOPS,
    SHAPES,
    ModelCost,
    environment,
    gpu_name,
    markdown_table,
    write_random_inputs,
)
from multigpu import step_figures
from training import mixer_weights, step_flops

PROTOCOL_TOKENS = {1: 100_000_000, 2: 250_000_000, 3: 100_000_000}  # SPEC section 3
PAPER_USD, PAPER_PARAMS = 2000.0, 72.7e9  # the paper's 72B conversion: "under $2,000"


def flops_per_token(teacher_dir: Path, arch: str, step: int, seq_len: int, **student_options) -> float:
    """bench/training.py's count for `step`, from meta-device models (no memory, no init);
    `student_options` as the run's config gives them (softmax_layers of a hybrid)."""
    from radlads.convert.plan import build_meta_models, load_config

    teacher, student = build_meta_models(load_config(teacher_dir), arch, **student_options)
    costs = ModelCost.of(teacher), ModelCost.of(student)
    return step_flops(step, *costs, mixer_weights(student), seq_len)["total"]


def student_options(config: dict) -> dict[str, Any]:
    """The run's student options for counting FLOPs: auto:N as any N softmax layers (the count
    depends on how many layers keep softmax, not which)."""
    from radlads.convert.layer_choice import auto_count

    options = dict(config.get("student") or {})
    n = auto_count(options.get("softmax_layers", ()))
    if n is not None:
        options["softmax_layers"] = list(range(n))
    return options


def summarise(
    runs: list[Path], gpu: str, peak_flops: float = PEAK_BF16_FLOPS, skip: int = 2
) -> dict[str, Any]:
    """The run folders (each a `radlads convert --out` or `radlads stepK --out`) as the one-GPU JSON
    (module docstring)."""
    steps = {}
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        for step, fig in step_figures(run, 1, skip, steps=(1, 2, 3)).items():
            seq_len = config[f"step{step}"]["seq_len"]
            flops = flops_per_token(
                Path(config["teacher"]), config["arch"], step, seq_len, **student_options(config)
            )
            steps[str(step)] = {
                "tokens_per_s": fig["tokens_per_s"],
                "mfu": fig["tokens_per_s"] * flops / peak_flops,
                "peak_gb": fig["peak_gb_per_gpu"][0] if fig["peak_gb_per_gpu"] else None,
                "batch": fig["micro_batch"],
                "optimizer": fig["optimizer"],
                "seq_len": seq_len,
                "flops_per_token": flops,
                "tokens": fig["tokens"],
                "windows": fig["windows"],
                "complete": fig["complete"],
                "run": str(run),
            }
    steps = dict(sorted(steps.items()))
    hours = None
    if set(steps) == {"1", "2", "3"}:
        hours = sum(n / steps[str(k)]["tokens_per_s"] for k, n in PROTOCOL_TOKENS.items()) / 3600
    return {
        "gpu": gpu,
        "steps": steps,
        "protocol_gpu_hours": hours,
        "protocol_tokens": {str(k): n for k, n in PROTOCOL_TOKENS.items()},
        "mfu_peak_tflops": peak_flops / 1e12,
        "skip_logs": skip,
    }


def compare_optimizers(runs: list[Path]) -> dict[str, Any]:
    """Held-out and training losses of runs of one step under different optimizers, each against
    the first run's (module docstring)."""
    rows, steps = [], set()
    for run in runs:
        record = json.loads((run / "radlads.json").read_text())
        step = max(k for k in record["steps"] if k != "0")
        steps.add(step)
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r.get("step") == int(step) and "loss" in r]  # fmt: skip
        rows.append({**record["steps"][step], "run": str(run), "losses": losses})
    if len(steps) > 1:
        raise ValueError(
            f"the runs end at different steps ({', '.join(sorted(steps))}): compare one step's runs"
        )
    base = rows[0]
    for row in rows:
        pairs = list(zip(row["losses"], base["losses"]))
        row["heldout_end_vs_first"] = row["heldout_end"] / base["heldout_end"] - 1
        row["max_logged_diff_vs_first"] = max((abs(a / b - 1) for a, b in pairs), default=None)
        row["last4_logged_diff_vs_first"] = (
            sum(a / b - 1 for a, b in pairs[-4:]) / len(pairs[-4:]) if pairs else None
        )
    return {"step": int(step), "runs": rows}


def project(measured: dict[str, Any], teachers: list[Path], usd_per_gpu_hour: float) -> dict[str, Any]:
    """The protocol's GPU-hours and price for each teacher config at the measured per-step MFU
    (module docstring), with the paper's cost per teacher parameter beside it."""
    from radlads.convert.plan import build_meta_models, count_params, load_config

    peak = measured["mfu_peak_tflops"] * 1e12
    rows = []
    for teacher in teachers:
        params = count_params(build_meta_models(load_config(teacher))[0])
        hours = {}
        for step, tokens in PROTOCOL_TOKENS.items():
            fig = measured["steps"][str(step)]
            flops = flops_per_token(teacher, "rad-rwkv7", step, fig["seq_len"])
            hours[str(step)] = tokens * flops / (fig["mfu"] * peak) / 3600
        total = sum(hours.values())
        usd = total * usd_per_gpu_hour
        rows.append(
            {
                "teacher": teacher.stem,
                "teacher_params": params,
                "gpu_hours": hours,
                "protocol_gpu_hours": total,
                "usd": usd,
                "usd_per_b_params": usd / params * 1e9,
                "vs_paper_per_param": (usd / params) / (PAPER_USD / PAPER_PARAMS),
            }
        )
    return {
        "measured_on": measured["gpu"],
        "mfu": {k: v["mfu"] for k, v in measured["steps"].items()},
        "usd_per_gpu_hour": usd_per_gpu_hour,
        "protocol_tokens": {str(k): n for k, n in PROTOCOL_TOKENS.items()},
        "paper": {"usd": PAPER_USD, "teacher_params": PAPER_PARAMS},
        "teachers": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inputs", help="config.json-only teacher, its tokenizer, random token shards")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    p.add_argument("--train-tokens", type=int, default=16_000_000)
    p.add_argument("--heldout-tokens", type=int, default=262_144)
    p = sub.add_parser("summary", help="the run's metrics.jsonl as the one-GPU JSON")
    p.add_argument("--run", type=Path, nargs="+", required=True, help="convert/stepK --out folders")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--gpu", help="GPU name (default: this machine's CUDA device)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS / 1e12, help="MFU's ceiling")
    p.add_argument("--skip-logs", type=int, default=2, help="logged windows per step left out as warm-up")
    p = sub.add_parser("optimizers", help="losses of one step's runs under different optimizers")
    p.add_argument(
        "--run", type=Path, nargs="+", required=True, help="stepK --out folders; the first is the reference"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p = sub.add_parser("project", help="the protocol's cost for other teachers at the measured MFU")
    p.add_argument("--measured", type=Path, required=True, help="a summary's JSON (all three steps)")
    p.add_argument("--teacher", type=Path, nargs="+", required=True, help="teacher config.json files")
    p.add_argument("--usd-per-gpu-hour", type=float, default=2.5)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.command == "inputs":
        write_random_inputs(args.work, args.shape, args.train_tokens, args.heldout_tokens, weights=False)
        return
    if args.command == "optimizers":
        comparison = compare_optimizers(args.run) | {"environment": environment()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(comparison, indent=1) + "\n")
        columns = ["optimizer", "heldout_start", "heldout_end", "heldout_end_vs_first",
                   "max_logged_diff_vs_first", "last4_logged_diff_vs_first"]  # fmt: skip
        print(markdown_table(comparison["runs"], columns))
        return
    if args.command == "project":
        measured = json.loads(args.measured.read_text())
        projection = project(measured, args.teacher, args.usd_per_gpu_hour) | {"environment": environment()}
        args.out.write_text(json.dumps(projection, indent=1) + "\n")
        rows = [
            {
                "teacher": r["teacher"],
                "GPU-hours": r["protocol_gpu_hours"],
                "USD": r["usd"],
                "USD per B params": r["usd_per_b_params"],
                "x paper per param": r["vs_paper_per_param"],
            }
            for r in projection["teachers"]
        ]
        print(markdown_table(rows, list(rows[0])))
        return
    gpu = args.gpu or gpu_name()
    summary = summarise(args.run, gpu, args.peak_tflops * 1e12, args.skip_logs) | {
        "environment": environment()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
