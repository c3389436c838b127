"""Where a prefill's GPU time goes: the top kernels of one teacher and one student prefill.

A diagnosis aid for bench/inference.py's prefill ratio, not a benchmark: it prints, per model,
the kernels with the most self CUDA time (torch.profiler) over one prefill after a warm-up.

    python bench/prefill_profile.py --batch 1 --context 16384          # H100
    PYTHONPATH=src python bench/prefill_profile.py --tiny               # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch
from common import build_student, build_teacher, pick_device
from torch.profiler import ProfilerActivity, profile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--arch", default="rad-rwkv7")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.context = "tiny", 128
    return args


def top_kernels(model, ids: torch.Tensor, top: int) -> str:
    def prefill():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        prefill()  # compile and autotune outside the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
        with profile(activities=activities) as prof:
            prefill()
            if ids.is_cuda:
                torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if ids.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=70)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = build_teacher(args.shape, device, dtype)
    student = build_student(teacher, args.arch)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.context), device=device)
    for name, model in (("teacher", teacher), (args.arch, student)):
        print(
            f"\n## {name}: prefill of {args.batch} x {args.context} tokens\n{top_kernels(model, ids, args.top)}"
        )


if __name__ == "__main__":
    main()
