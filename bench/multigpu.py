"""Helpers of scripts/device_multigpu.sh (multi-GPU `radlads convert`, FSDP2): build its inputs,
kill a run right after its first mid-step checkpoint, and summarise the runs.

  python bench/multigpu.py inputs --work W [--shape qwen2.5-0.5b] [--train-tokens 8M]
  python bench/multigpu.py kill-after-checkpoint --checkpoint DIR -- CMD...
  python bench/multigpu.py summary --work W --out OUT [--skip-logs 2]

The shell script is the documented entry point (docs/benchmarks.md, "Multi-GPU (FSDP2)").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import SHAPES, markdown_table, write_json, write_random_inputs

# --------------------------------------------------------------------------- the killed run


def kill_after_checkpoint(checkpoint: Path, cmd: list[str]) -> dict[str, Any]:
    """Run `cmd` (its output goes to ours) in its own process group; SIGTERM the group, as a
    scheduler ends a job, as soon as the mid-step checkpoint `checkpoint` appears. Returns what
    the checkpoint holds."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    # If this helper is itself ended (the stage's time limit), end the run too: it is in its own group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        while proc.poll() is None and not (checkpoint / "trainer.json").is_file():
            time.sleep(0.5)
        killed_after_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not (checkpoint / "trainer.json").is_file():
        return {"error": f"no checkpoint appeared; the run exited with {proc.returncode}"}
    state = json.loads((checkpoint / "trainer.json").read_text())
    shards = list((checkpoint / "dcp").glob("*.distcp"))
    return {
        "killed_after_s": round(killed_after_s, 1),
        "exit_code": proc.returncode,
        "checkpoint_tokens": state["tokens"],
        "checkpoint_complete": state["complete"],
        "checkpoint_shard_files": len(shards),
        "checkpoint_gb": round(sum(p.stat().st_size for p in shards) / 1e9, 3),
    }


# --------------------------------------------------------------------------- summary


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def step_figures(run: Path, world: int, skip: int, steps=(1, 2)) -> dict[int, dict]:
    """Per step of one run: steady-state tokens/s (median over the logged windows after the first
    `skip`, which hold compilation and warm-up), per GPU too, each rank's peak memory, and the
    micro-batch and optimizer it ended with."""
    finished = read_json(run / "radlads.json").get("steps", {})
    figures, lines = {}, records(run / "metrics.jsonl")
    for step in steps:
        logged = [r for r in lines if r["step"] == step]
        if not logged:
            continue
        steady = [r["tokens_per_s"] for r in logged[skip:]] or [r["tokens_per_s"] for r in logged]
        peaks = [r["max_memory_allocated_gb"] for r in logged if "max_memory_allocated_gb" in r]
        figures[step] = {
            "gpus": world,
            "tokens_per_s": statistics.median(steady),
            "tokens_per_s_per_gpu": statistics.median(steady) / world,
            "windows": len(steady),
            "peak_gb_per_gpu": [max(p[rank] for p in peaks) for rank in range(world)] if peaks else None,
            "tokens": logged[-1]["tokens"],
            "micro_batch": logged[-1].get("micro_batch"),
            "optimizer": logged[-1].get("optimizer"),
            "complete": finished.get(str(step), {}).get("complete", False),
            "wall_s": finished.get(str(step), {}).get("wall_s"),
        }
    return figures


def resume_figures(work: Path) -> dict[str, Any]:
    """The 2-GPU step 2 killed after its mid-step checkpoint and continued on 1 GPU, against the
    uninterrupted 2-GPU run (same seed, data order and global batch, so the same logged token
    counts). Held-out losses are not compared: the held-out batches depend on the process count."""
    result = read_json(work / "resume" / "kill.json")
    if "checkpoint_tokens" not in result:
        return {"status": "not run" if not result else "failed", **result}
    if result["checkpoint_complete"]:
        return {"status": "step 2 finished before the kill: nothing was resumed", **result}
    at = result["checkpoint_tokens"]
    before = [r for r in records(work / "resume" / "metrics.before-resume.jsonl") if r["step"] == 2]
    after = [r for r in records(work / "resume" / "metrics.jsonl") if r["step"] == 2 and r["tokens"] > at]
    uninterrupted = {
        r["tokens"]: r["loss"] for r in records(work / "gpu2" / "metrics.jsonl") if r["step"] == 2
    }
    last_before = next((r for r in reversed(before) if r["tokens"] <= at), None)
    first_after = after[0] if after else None
    pairs = [(r["loss"], uninterrupted[r["tokens"]]) for r in after if r["tokens"] in uninterrupted]
    finished = read_json(work / "resume" / "radlads.json").get("steps", {}).get("2", {})
    return {
        "status": "ok" if finished.get("complete") else "not finished",
        **result,
        "last_loss_before": last_before and {k: last_before[k] for k in ("tokens", "loss")},
        "first_loss_after": first_after and {k: first_after[k] for k in ("tokens", "loss")},
        "uninterrupted_loss_there": pairs[0][1] if pairs else None,
        "max_rel_diff_after_resume_vs_uninterrupted": max(
            (abs(a - b) / abs(b) for a, b in pairs), default=None
        ),
        "compared_logs": len(pairs),
    }


def summarise(work: Path, out: Path, skip: int) -> str:
    one, two = step_figures(work / "gpu1", 1, skip), step_figures(work / "gpu2", 2, skip)
    rows = []
    for step in (1, 2):
        for figures in (one, two):
            if step not in figures:
                continue
            row = {"step": step, **figures[step]}
            if figures is two and step in one:
                row["scaling_efficiency"] = row["tokens_per_s"] / (2 * one[step]["tokens_per_s"])
            rows.append(row)
    resume = resume_figures(work)
    stages = (work / "stages.txt").read_text().splitlines() if (work / "stages.txt").is_file() else []
    write_json(out, "multigpu", {"steps": rows, "resume": resume, "stages": stages, "skip_logs": skip})
    for row in rows:  # as text for the table
        row["peak_gb_per_gpu"] = " / ".join(f"{g:.1f}" for g in row["peak_gb_per_gpu"] or []) or None
    columns = ["step", "gpus", "tokens_per_s", "tokens_per_s_per_gpu", "scaling_efficiency",
               "peak_gb_per_gpu", "windows", "tokens", "complete", "wall_s"]  # fmt: skip
    text = "\n".join(
        [
            "Multi-GPU (FSDP2) `radlads convert`, 1 vs 2 GPUs, same per-GPU batch:",
            "",
            markdown_table(rows, columns),
            "",
            "Resume on 1 GPU of the 2-GPU step 2 killed after its mid-step (DCP) checkpoint:",
            "",
            markdown_table([{"what": k, "value": v} for k, v in resume.items()], ["what", "value"]),
            "",
            "Stages: " + "; ".join(stages),
        ]
    )
    (out / "summary.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inputs")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--train-tokens", type=int, default=8_000_000)
    p.add_argument("--heldout-tokens", type=int, default=262_144)
    p = sub.add_parser("kill-after-checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("summary")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-logs", type=int, default=2, help="logged windows per step left out as warm-up")
    args = parser.parse_args()
    if args.command == "inputs":
        write_random_inputs(args.work, args.shape, args.train_tokens, args.heldout_tokens)
    elif args.command == "kill-after-checkpoint":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        result = kill_after_checkpoint(args.checkpoint, cmd)
        (args.checkpoint.parents[1] / "kill.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        sys.exit(0 if result.get("checkpoint_complete") is False else 1)
    else:
        print(summarise(args.work, args.out, args.skip_logs))


if __name__ == "__main__":
    main()
