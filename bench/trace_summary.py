"""Where a profiled update's GPU time goes, over time: reads a timeline that
`training.py --profile N --trace` wrote (a gzipped Chrome trace) and prints

- per time window: how busy the GPU was and its kernel time by family, which shows the phases of
  an update (teacher forward, student forward, loss, backward, optimizer) and which one idles;
- the longest idle gaps between kernels, with the kernels either side;
- the kernels with the most GPU time.

    python bench/trace_summary.py bench/results/trace-qwen2.5-0.5b-step2-radlads-b48.json.gz
    python bench/trace_summary.py TRACE --window-ms 10 --from-ms 100 --to-ms 200   # one phase

The profiler slows the host (each CPU op takes longer while recorded), so idle gaps here can be
longer than in the unprofiled updates `training.py` times: compare busy time with its `update_ms`.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import kernel_family, markdown_table


@dataclass(frozen=True)
class Kernel:
    name: str
    start_us: float  # from the first kernel's start
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


def load_kernels(path: Path) -> list[Kernel]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    raw = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not raw:
        raise SystemExit(f"{path} has no GPU kernels: was it written on a GPU by training.py --trace?")
    t0 = raw[0]["ts"]
    return [Kernel(e["name"], e["ts"] - t0, e["dur"]) for e in raw]


def windows(kernels: list[Kernel], window_us: float) -> list[dict]:
    """Busy share and kernel milliseconds by family per window, by kernel start time."""
    by_window: dict[int, Counter] = defaultdict(Counter)
    for k in kernels:
        by_window[int(k.start_us // window_us)][kernel_family(k.name)] += k.dur_us
    return [
        dict(
            from_ms=w * window_us / 1e3,
            busy=sum(families.values()) / window_us,
            families=", ".join(f"{f} {us / 1e3:.1f}" for f, us in families.most_common()),
        )
        for w, families in sorted(by_window.items())
    ]


def gaps(kernels: list[Kernel], top: int) -> list[dict]:
    """The `top` longest stretches with no kernel running, and what ran either side."""
    found, end, last = [], 0.0, None
    for k in kernels:
        if last is not None and k.start_us > end:
            found.append(
                dict(
                    at_ms=end / 1e3,
                    idle_ms=(k.start_us - end) / 1e3,
                    after=last.name[:60],
                    before=k.name[:60],
                )
            )
        if k.end_us > end:
            end, last = k.end_us, k
    return sorted(found, key=lambda g: -g["idle_ms"])[:top]


def top_kernels(kernels: list[Kernel], top: int) -> list[dict]:
    time_us, calls = Counter(), Counter()
    for k in kernels:
        time_us[k.name] += k.dur_us
        calls[k.name] += 1
    return [dict(ms=us / 1e3, calls=calls[n], kernel=n[:100]) for n, us in time_us.most_common(top)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--from-ms", type=float, default=0.0, help="only kernels starting from here")
    p.add_argument("--to-ms", type=float, default=float("inf"), help="... and before here")
    p.add_argument("--top", type=int, default=15, help="gaps and kernels listed")
    args = p.parse_args(argv)
    kernels = [k for k in load_kernels(args.trace) if args.from_ms * 1e3 <= k.start_us < args.to_ms * 1e3]
    if not kernels:
        raise SystemExit(f"no kernel starts between {args.from_ms} and {args.to_ms} ms")
    span_us = kernels[-1].end_us - kernels[0].start_us
    busy_us = sum(k.dur_us for k in kernels)
    print(f"{len(kernels)} kernels, {busy_us / 1e3:.1f} ms of kernel time in a {span_us / 1e3:.1f} ms span")
    print(
        "\n## By window\n"
        + markdown_table(windows(kernels, args.window_ms * 1e3), ["from_ms", "busy", "families"])
    )
    print(
        "\n## Longest idle gaps\n"
        + markdown_table(gaps(kernels, args.top), ["at_ms", "idle_ms", "after", "before"])
    )
    print("\n## Top kernels\n" + markdown_table(top_kernels(kernels, args.top), ["ms", "calls", "kernel"]))


if __name__ == "__main__":
    main()
