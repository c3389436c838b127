"""Can step 1's teacher forward hide behind the student's update on a second CUDA stream?

Step 1 runs the teacher (no grad, matmul-bound) and then the student's time mixers (fla's RWKV-7
kernels, far from the tensor cores' rate): if the GPU ran the two side by side, a pipelined
step 1 could compute the next batch's teacher I/O while the current batch trains. This measures
the premise before anything is built on it, on the path `radlads convert` runs (bench/training.py's
`radlads-keep` trainer):

    teacher     the teacher's attention I/O of one batch (what step 1 computes first)
    student     one update from teacher I/O computed beforehand (the student's share)
    update      one whole step-1 update (teacher, then student)
    serial      teacher of another batch, then a whole update, on one stream
    overlapped  the same two, the teacher on a second stream

    python bench/step1_overlap.py --batch 64 --out results/
    PYTHONPATH=src python bench/step1_overlap.py --tiny      # CPU: the code path, one stream
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import training
from common import (
    add_run_arguments,
    build_student,
    build_teacher,
    default_out_dir,
    median,
    peak_memory,
    pick_device,
    time_ms,
    write_json,
)

from radlads.convert.alignment import alignment_loss, student_attention_outputs, teacher_attention_io


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument(
        "--batch", type=int, default=64, help="sequences; three batches' teacher I/O are alive at once"
    )
    p.add_argument("--seq-len", type=int, default=512)
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.batch, args.seq_len = "tiny", 2, 32
    args.out = args.out or default_out_dir()
    return args


def workloads(
    teacher, student, trainer, ids: list[torch.Tensor], device: torch.device
) -> dict[str, Callable]:
    """The five timed runs of the docstring; ids: two batches (the update's, the other teacher's)."""
    io = teacher_attention_io(teacher, ids[0])
    whole_loss = trainer.loss

    def teacher_io():
        return teacher_attention_io(teacher, ids[1])

    def update():
        return trainer.train_step(itertools.repeat(ids[0]), trainer.cfg.lr)

    def student_update():
        trainer.loss = lambda batch: alignment_loss(student_attention_outputs(student, io), io.outputs, True)
        try:
            return update()
        finally:
            trainer.loss = whole_loss

    def serial():
        teacher_io()
        update()

    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def overlapped():
        if side is None:
            return serial()
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            teacher_io()
        update()
        torch.cuda.current_stream(device).wait_stream(side)

    return dict(
        teacher=teacher_io, student=student_update, update=update, serial=serial, overlapped=overlapped
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = build_teacher(args.shape, device, dtype)
    student = build_student(teacher, "rad-rwkv7").to(device=device, dtype=torch.float32).train()
    bench_args = training.parse_args(["--shapes", args.shape, "--steps", "1", "--seq-len", str(args.seq_len)])
    trainer = training.make_trainer("radlads-keep", 1, teacher, student, bench_args, args.batch, device)
    vocab = teacher.config.vocab_size
    ids = [torch.randint(0, vocab, (args.batch, args.seq_len), device=device) for _ in range(2)]
    runs = workloads(teacher, student, trainer, ids, device)
    results = {
        name: median(time_ms(fn, device, warmup=2, repeats=6, max_total_s=30.0)) for name, fn in runs.items()
    }
    peak = peak_memory(device)
    results["overlapped / serial"] = results["overlapped"] / results["serial"]
    results["peak_gib"] = None if peak is None else peak / 2**30
    path = write_json(args.out, f"step1-overlap-b{args.batch}", dict(args=vars(args), results=results))
    for name, value in results.items():
        print(f"{name:>20}: {value if value is None else round(value, 3)}")
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
