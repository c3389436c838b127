"""radlads' own Triton kernels against what they replace, on identical inputs.

    kl      step 2's per-chunk loss terms: KL(teacher || student) summed over rows of logits, and
            its gradient softmax(s) - softmax(t) in bf16 (radlads.kernels.kl_div)

Methods: the eager PyTorch code, the same code through torch.compile (Inductor's fused kernels:
what radlads ran before the Triton kernel), and the Triton kernel at several block sizes and warp
counts. Inputs have the Qwen2.5-0.5B shape: a chunk of 4096 rows of 151936 logits. Each row
reports the median time of back-to-back calls and its ratio to the compiled code in the same run,
the bandwidth against the least traffic the terms need (both logit tensors read once, the gradient
written once), and the largest difference from the eager code.

    python bench/triton_kernels.py --out results/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import default_out_dir, markdown_table, median, pick_device, time_ms, write_json

from radlads.train.losses import compiled, kl_terms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="kl: logit rows (step 2's chunk)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--kl-configs", default="2048x8,4096x8,8192x16", help="kl: BLOCKxWARPS,...")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.out = args.out or default_out_dir()
    return args


def logits(rows: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """Peaked like a trained LM's: a few large logits over a spread of small ones."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = 2.0 * torch.randn(rows, vocab, device=device, generator=g)
    x[:, :64] += 8.0 * torch.rand(rows, 64, device=device, generator=g)
    return x.bfloat16()


def bench_kl(args, device) -> list[dict]:
    from radlads.kernels.kl_div import kl_terms_triton

    s, t = logits(args.rows, args.vocab, device, 0), logits(args.rows, args.vocab, device, 1)
    out = torch.empty_like(s)
    methods = {"eager": lambda: kl_terms(s, t), "compiled": lambda: compiled(kl_terms)(s, t)}
    for config in args.kl_configs.split(","):
        block, warps = (int(x) for x in config.split("x"))
        methods[f"triton {block}x{warps}"] = lambda b=block, w=warps: kl_terms_triton(s, t, out, b, w)
    least_bytes = 3 * s.numel() * s.element_size()
    want = kl_terms(s, t)
    rows = []
    for name, fn in methods.items():
        got = fn()
        # back to back, as training queues them: the host's time per call stays off the timeline
        ms = median(time_ms(lambda fn=fn: [fn() for _ in range(10)], device, warmup=1, repeats=10)) / 10
        err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
        rows.append(dict(method=name, ms=ms, gb_s=least_bytes / (ms * 1e6), max_err=err))
    base = next(r["ms"] for r in rows if r["method"] == "compiled")
    for r in rows:
        r["x_compiled"] = base / r["ms"]
    print(f"\n## kl: {args.rows} x {args.vocab} bf16 logits\n")
    print(markdown_table(rows, ["method", "ms", "x_compiled", "gb_s", "max_err"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    results = {"kl": bench_kl(args, device)}
    write_json(args.out, "triton_kernels", dict(args=vars(args), results=results))


if __name__ == "__main__":
    main()
