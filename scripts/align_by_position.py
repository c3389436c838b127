"""Step 1's attention alignment for a few layers, measured by position within a window: does a
student option (the output GroupNorm, the decay init) or a longer step-1 sequence fit the
teacher's attention better far into a window?

Each arm is a RAD-RWKV7 student of TEACHER whose listed layers' time mixers train on step 1's loss
(`layer_alignment_loss` against the teacher's attention outputs, the library's step-1 optimizer
settings), all arms on the same batches. Before and after training, each evaluated layer's
alignment loss, cosine and output-norm ratio (student / teacher) are averaged over position
buckets of held-out windows (2,048 tokens), and written to OUT (JSON) and printed.

    python scripts/align_by_position.py TEACHER SHARDS OUT.json --arms default,groupnorm
    python scripts/align_by_position.py TEACHER SHARDS OUT.json --arms default --seq-len 2048 --batch 1

--arms, from ARMS: "default" (no output norm, y * N^-1/2; the decay schedule across heads; a0 = 0),
"groupnorm" (`groupnorm: true`), "per-head-decay" (`decay_init: per-head`), "iclr-low" and
"iclr-high" (`init_a0: -2` and `2`). Layer 0 is always trained as well: it makes the `v_first` the
other layers mix in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from radlads.convert.alignment import layer_alignment_loss, student_attention_outputs, teacher_attention_io
from radlads.convert.transfer import load_teacher, transfer
from radlads.data import PackedLoader
from radlads.train.config import StepConfig
from radlads.train.optimizers import build_optimizer, param_groups, set_lr
from radlads.train.trainer import learning_rate

ARMS = {
    "default": {},
    "groupnorm": {"groupnorm": True},
    "per-head-decay": {"decay_init": "per-head"},
    # the in-context rate a = sigmoid(a0 + ...) at init: 0.12 and 0.88 around the default 0.5
    "iclr-low": {"init_a0": -2.0},
    "iclr-high": {"init_a0": 2.0},
}
BUCKETS = [(0, 64), (64, 256), (256, 512), (512, 1024), (1024, 2048)]


@torch.no_grad()
def by_position(student, io, layers: list[int], buckets) -> dict[int, list[dict[str, float]]]:
    outputs = student_attention_outputs(student, io, layers=layers)
    result = {}
    for i in layers:
        y_t, y_s = io.outputs[i].float(), outputs[i].float()
        loss = (y_t - y_s).norm(dim=-1) * y_t.shape[-1] ** -0.5  # step 1's per-token term
        cos = F.cosine_similarity(y_s, y_t, dim=-1)
        n_s, n_t = y_s.norm(dim=-1), y_t.norm(dim=-1)
        result[i] = [
            {
                "loss": loss[:, a:b].mean().item(),
                "cos": cos[:, a:b].mean().item(),
                "norm_ratio": (n_s[:, a:b].mean() / n_t[:, a:b].mean()).item(),
            }
            for a, b in buckets
        ]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("shards")
    p.add_argument("out", type=Path)
    p.add_argument("--arms", default="default,groupnorm", help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--layers", default="2,10,20,28", help="layers trained and measured (0 is trained too)")
    p.add_argument("--updates", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heldout-windows", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=2048, help="held-out window length (buckets cut to it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        p.error(f"--arms takes names from {', '.join(ARMS)}, got {args.arms!r}")
    layers = [int(x) for x in args.layers.split(",")]
    trained = sorted(set(layers) | {0})
    tokens = args.updates * args.seq_len * args.batch
    step = StepConfig(  # step 1's defaults (LR 1e-3 falling to 1e-5, clip 1, no weight decay)
        tokens=tokens,
        lr=1e-3,
        lr_final=1e-5,
        seq_len=args.seq_len,
        global_batch_size=args.batch,
        batch_size=args.batch,
    )

    teacher = load_teacher(args.teacher)
    students = {}
    for arm in arms:
        torch.manual_seed(args.seed)
        student = transfer(teacher, arch="rad-rwkv7", **ARMS[arm]).float().requires_grad_(False)
        params = [q.requires_grad_() for i in trained for q in student.model.layers[i].self_attn.parameters()]
        optimizer = build_optimizer("adamw", param_groups(params, [], 1.0, step.weight_decay), step)
        students[arm] = (student, params, optimizer)

    buckets = [(a, min(b, args.eval_len)) for a, b in BUCKETS if a < args.eval_len]
    heldout = next(iter(PackedLoader(args.shards, args.eval_len, args.heldout_windows, split="heldout")))
    eval_io = teacher_attention_io(teacher, heldout)
    report = {"settings": vars(args) | {"out": str(args.out)}, "buckets": buckets, "arms": {}}
    for arm, (student, _, _) in students.items():
        report["arms"][arm] = {"init": by_position(student, eval_io, layers, buckets), "train_loss": []}

    batches = iter(PackedLoader(args.shards, args.seq_len, args.batch, split="train", seed=args.seed))
    start = time.time()
    for update in range(args.updates):
        io = teacher_attention_io(teacher, next(batches))
        lr = learning_rate(step, update * args.seq_len * args.batch)
        for arm, (student, params, optimizer) in students.items():
            outputs = student_attention_outputs(student, io, layers=trained)
            loss = torch.stack([layer_alignment_loss(outputs[i], io.outputs[i]) for i in trained]).sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, step.clip)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report["arms"][arm]["train_loss"].append(loss.item())
        if update % 10 == 0 or update == args.updates - 1:
            losses = {arm: round(report["arms"][arm]["train_loss"][-1], 4) for arm in arms}
            print(f"update {update}: {losses} ({time.time() - start:.0f} s)", flush=True)

    for arm, (student, _, _) in students.items():
        report["arms"][arm]["trained"] = by_position(student, eval_io, layers, buckets)
    args.out.write_text(json.dumps(report, indent=1))
    print("layer arm            when     " + " ".join(f"{a}-{b - 1}".rjust(10) for a, b in buckets))
    for i in layers:
        for arm in arms:
            for when in ("init", "trained"):
                cells = report["arms"][arm][when][i]
                print(f"{i:<5} {arm:<14} {when:<8} " + " ".join(f"{c['loss']:10.3f}" for c in cells))


if __name__ == "__main__":
    main()
