"""Two bench/training.py runs side by side: each row of the second against the same (shape, step,
variant, batch) of the first, as a ratio of tokens/s. scripts/device_perf.sh prints it when it ran
an earlier tree first (.ab/, scripts/ab_base.sh), both on the same machine in the same call.

    python bench/compare_runs.py BASE/training.json NEW/training.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import markdown_table

KEY = ("shape", "step", "variant", "batch")


def compare(base: dict, new: dict) -> list[dict]:
    timed = {tuple(r[k] for k in KEY): r for r in base["results"] if "tok_s" in r}
    rows = []
    for r in new["results"]:
        b = timed.get(tuple(r[k] for k in KEY))
        if b is None or "tok_s" not in r:
            continue
        rows.append(
            {
                **{k: r[k] for k in KEY},
                "base_update_ms": b["update_ms"],
                "new_update_ms": r["update_ms"],
                "base_mfu": b["mfu"],
                "new_mfu": r["mfu"],
                "tok_s_ratio": r["tok_s"] / b["tok_s"],
                "base_busy": b.get("gpu_busy"),
                "new_busy": r.get("gpu_busy"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path)
    args = p.parse_args(argv)
    base, new = (json.loads(path.read_text()) for path in (args.base, args.new))
    base_tree, new_tree = (run["environment"].get("source_sha256", "?")[:12] for run in (base, new))
    print(f"base source {base_tree}, new source {new_tree}")
    rows = compare(base, new)
    print(markdown_table(rows, list(rows[0]) if rows else list(KEY)))


if __name__ == "__main__":
    main()
