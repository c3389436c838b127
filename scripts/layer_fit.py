"""How well a time mixer fits each teacher layer alone: step 1 for one layer at a time, on the CPU.

    python3 scripts/layer_fit.py TEACHER SHARDS OUT [--updates 100] [--seq-len 512] [--layers 17,18]
        [--repeat-fraction 0.5] [--lm-updates 300] [--together]

Each layer's RAD-RWKV7 mixer (fresh from step 0) is trained on that layer's own attention input
and output, as step 1 trains it, then scored on held-out windows: the relative error
||y_teacher - y_student|| / ||y_teacher|| per token, and the step-1 loss term. Then the teacher
runs the copying probe (radlads.eval.copying) with that one layer's attention replaced by the
fitted mixer: how much of the teacher's copying survives losing that layer's attention, and
its next-token NLL on the held-out windows (plain text) the same way. Writes
OUT/layer_fit.json. About 20 s a layer for a 135M teacher on 2 CPU cores at the defaults.

--repeat-fraction F shows, in about that fraction of the training windows, a span of training
text twice, as `convert --stepK-repeat-fraction` does: ordinary text seldom repeats, so a mixer
fitted on it alone rarely sees the teacher's induction heads at work. Whether a mixer then
learns the copying lookup, or cannot hold it in its state, is what the copy NLL tells apart.
--lm-updates N then trains the aligned mixer N more updates inside the otherwise intact teacher,
on its next-token loss (as step 2 trains the whole student on the teacher's outputs): if the mixer
copies then and not after alignment alone, the lookup fits in its state and step 1's objective is
what misses it.
--lm-loss kl makes them step 2's KL from the intact teacher instead of cross-entropy on the text.
--together swaps the listed layers as one group instead of one at a time: each is aligned as
above, the next-token updates train them jointly, and the probes run with all of them replaced.
The copying circuit spans layers (a previous-token head feeds an induction head), so whether
mixers can form it among themselves, with no teacher attention left in it, is a question about
the group, not about any one layer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import torch

from radlads.convert.alignment import attention_input, layer_alignment_loss, teacher_attention_io
from radlads.convert.transfer import load_teacher, transfer
from radlads.data import PackedLoader
from radlads.eval.copying import PREFIX, SPAN, evaluate_copying
from radlads.teachers import load_teacher_tokenizer, resolve_teacher

MICRO_BATCH = 2
COPY_DISTANCES = (0, 64)


def windows(shards: str, seq_len: int, n: int, split: str, repeat_fraction: float = 0.0) -> torch.Tensor:
    loader = PackedLoader(shards, seq_len, 1, split=split, seed=1, repeat_fraction=repeat_fraction)
    return torch.cat([batch for batch, _ in zip(loader, range(n))])


def layer_io(teacher, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's attention input and output, [layers, sequences, T, C], in bf16 to save memory."""
    ins, outs = [], []
    for i in range(0, len(ids), 4):
        io = teacher_attention_io(teacher, ids[i : i + 4])
        ins.append(torch.stack([x.bfloat16() for x in io.inputs]))
        outs.append(torch.stack([y.bfloat16() for y in io.outputs]))
    return torch.cat(ins, 1), torch.cat(outs, 1)


@torch.no_grad()
def centre_keys(student, inputs: torch.Tensor) -> None:
    """Project each KV head's mean key direction (before RoPE, over `inputs`: [layers, windows, T,
    C], each layer's attention input) out of every time mixer's Wk and bias. In SmolLM2 that
    direction carries 41-94% of a head's squared key norm; under RoPE it is a relative-position
    bias, which softmax keeps, and which a linear state adds into every readout."""
    cfg = student.config
    for layer, x in zip(student.model.layers, inputs):
        k_proj = layer.self_attn.k_proj
        heads, head_dim = cfg.num_key_value_heads, k_proj.out_features // cfg.num_key_value_heads
        keys = torch.nn.functional.linear(x.float().flatten(0, 1), k_proj.weight, k_proj.bias)
        u = torch.nn.functional.normalize(keys.view(-1, heads, head_dim).mean(0), dim=-1)
        weight = k_proj.weight.view(heads, head_dim, -1)
        weight -= u[:, :, None] * torch.einsum("hd,hdc->hc", u, weight)[:, None, :]
        if k_proj.bias is not None:
            bias = k_proj.bias.view(heads, head_dim)
            bias -= u * (u * bias).sum(-1, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher")
    p.add_argument("shards")
    p.add_argument("out", type=Path)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--train-windows", type=int, default=40)
    p.add_argument("--heldout-windows", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", help="comma-separated layers to fit (default: all)")
    p.add_argument("--repeat-fraction", type=float, default=0.0, help="training windows shown twice")
    p.add_argument(
        "--lm-updates",
        type=int,
        default=0,
        help="updates on the swapped teacher's next-token loss after alignment (slower: the whole "
        "teacher runs forward and backward each update)",
    )
    p.add_argument("--lm-lr", type=float, default=1e-4, help="the LR of those updates")
    p.add_argument(
        "--lm-loss",
        choices=("ce", "kl"),
        default="ce",
        help="those updates' loss: cross-entropy on the text, or KL from the intact teacher's "
        "next-token distributions (step 2's loss)",
    )
    p.add_argument("--together", action="store_true", help="swap and train the listed layers as one group")
    p.add_argument(
        "--centre-keys",
        action="store_true",
        help="before fitting, project each KV head's mean key direction out of the mixers' Wk (centre_keys)",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    teacher_dir = resolve_teacher(args.teacher)
    teacher, tokenizer = load_teacher(teacher_dir), load_teacher_tokenizer(teacher_dir)
    teacher.requires_grad_(False)  # only the mixers train, whatever the objective
    train = windows(args.shards, args.seq_len, args.train_windows, "train", args.repeat_fraction)
    x_train, y_train = layer_io(teacher, train)
    held = windows(args.shards, args.seq_len, args.heldout_windows, "heldout")
    x_held, y_held = layer_io(teacher, held)
    student = transfer(teacher, arch="rad-rwkv7")
    if args.centre_keys:
        centre_keys(student, x_train)
    position_ids = torch.arange(max(args.seq_len, PREFIX + 2 * SPAN + max(COPY_DISTANCES)))[None]
    cos, sin = student.model.rotary_emb(x_train[0, :1].float(), position_ids)
    first = copy.deepcopy(student.model.layers[0].self_attn).eval()  # layer 0 as step 0 left it

    last_v_first: dict = {}

    def run(layer: int, x: torch.Tensor, x_first: torch.Tensor, group: tuple[int, ...]) -> torch.Tensor:
        """The layer's mixer on x. v_first comes from layer 0's mixer: the one being trained when
        layer 0 is in the group (as in step 1), else layer 0's as step 0 left it."""
        T = x.shape[1]
        rope = cos[:, :T].expand(len(x), -1, -1), sin[:, :T].expand(len(x), -1, -1)
        v_first = None
        if layer:
            if last_v_first.get("of") is not x_first:  # once per forward, not once per layer
                with contextlib.nullcontext() if 0 in group else torch.no_grad():
                    source = student.model.layers[0].self_attn if 0 in group else first
                    last_v_first.update({"of": x_first, "v": source(x_first.float(), rope)[1]})
            v_first = last_v_first["v"]
        return student.model.layers[layer].self_attn(x.float(), rope, v_first=v_first)[0]

    @contextlib.contextmanager
    def swapped(group: tuple[int, ...]):
        """The teacher with each layer of `group` attending through its mixer (empty: the teacher
        as it is)."""
        handles = []
        if group:
            seen = {}

            def first_input(module, args, kwargs):
                seen["x_first"] = attention_input(args, kwargs)

            def swap(layer: int):
                def hook(module, args, kwargs, output):
                    y = run(layer, attention_input(args, kwargs), seen["x_first"], group)
                    return (y.to(output[0].dtype), *output[1:])

                return hook

            layers = teacher.model.layers
            handles = [layers[0].self_attn.register_forward_pre_hook(first_input, with_kwargs=True)]
            handles += [layers[i].self_attn.register_forward_hook(swap(i), with_kwargs=True) for i in group]
        try:
            yield teacher
        finally:
            for handle in handles:
                handle.remove()

    def copying(group: tuple[int, ...]) -> dict[int, float]:
        """Mean NLL on the probe's repeated span, with the group's attention replaced by mixers."""
        with swapped(group) as model:
            result = evaluate_copying(model, tokenizer, COPY_DISTANCES, progress=False)
        return {d: v["repeat"] for d, v in result.by_distance().items()}

    @torch.no_grad()
    def heldout_nll(group: tuple[int, ...]) -> float:
        """Next-token NLL on the held-out windows (plain text), with the group's attention
        replaced: what fitting the mixers to copy costs, or gains, on ordinary text."""
        with swapped(group) as model:
            return sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in held) / len(held)

    def update_loss(group: tuple[int, ...], batch: slice, lm: bool) -> torch.Tensor:
        """Step 1's loss on each layer's output (summed: each mixer's gradient is its own), or
        (lm) the swapped teacher's next-token loss, which trains the mixers for what the layers
        after them need."""
        if not lm:
            x, y = x_train[:, batch], y_train[:, batch]
            x_first = x[0]  # one tensor for every layer: run() computes its v_first once
            return sum(layer_alignment_loss(run(i, x[i], x_first, group), y[i]) for i in group)
        ids = train[batch]
        if args.lm_loss == "ce":
            with swapped(group) as model:
                return model(input_ids=ids, labels=ids).loss
        with torch.no_grad():
            target = teacher(input_ids=ids).logits.float().log_softmax(-1).flatten(0, 1)
        with swapped(group) as model:
            logits = model(input_ids=ids).logits.float().log_softmax(-1).flatten(0, 1)
        return torch.nn.functional.kl_div(logits, target, log_target=True, reduction="batchmean")

    @torch.no_grad()
    def fit(layer: int, group: tuple[int, ...]) -> dict[str, float]:
        y, target = run(layer, x_held[layer], x_held[0], group), y_held[layer].float()
        error = (y - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-6)
        return dict(
            relative_error=error.mean().item(),
            loss=layer_alignment_loss(y, target).item(),
            teacher_output_norm=target.norm(dim=-1).mean().item(),
        )

    teacher_copying, teacher_nll = copying(()), heldout_nll(())
    print(f"teacher: copy NLL {teacher_copying}, held-out NLL {teacher_nll:.4f}", flush=True)
    chosen = (
        [int(i) for i in args.layers.split(",")] if args.layers else range(teacher.config.num_hidden_layers)
    )
    groups = [tuple(chosen)] if args.together else [(i,) for i in chosen]
    fits = {}
    for group in groups:
        mixers = [student.model.layers[i].self_attn.train() for i in group]
        optimizer = torch.optim.Adam([p for m in mixers for p in m.parameters()], lr=args.lr)
        for update in range(args.updates + args.lm_updates):
            i = MICRO_BATCH * int(torch.randint(args.train_windows // MICRO_BATCH, ()))
            batch = slice(i, i + MICRO_BATCH)
            if update == args.updates:  # alignment done: the next-token updates from here
                for param_group in optimizer.param_groups:
                    param_group["lr"] = args.lm_lr
            loss = update_loss(group, batch, lm=update >= args.updates)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for m in mixers:
            m.eval()
        # one layer keeps the flat record of earlier runs; a group nests each layer's fit
        per_layer = {i: fit(i, group) for i in group}
        entry = per_layer[group[0]] if len(group) == 1 else {"fit": per_layer}
        entry["copy_nll_swapped"], entry["heldout_nll_swapped"] = copying(group), heldout_nll(group)
        fits[",".join(map(str, group))] = entry
        errors = ", ".join(f"{per_layer[i]['relative_error']:.3f}" for i in group)
        print(
            f"layers {','.join(map(str, group))}: relative error {errors}, "
            f"copy NLL with them swapped {entry['copy_nll_swapped']}, "
            f"held-out NLL {entry['heldout_nll_swapped']:.4f}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = dict(
        teacher=args.teacher, **{k: v for k, v in vars(args).items() if k not in ("teacher", "out")}
    )
    record = {
        **summary,
        "copy_nll_teacher": teacher_copying,
        "heldout_nll_teacher": teacher_nll,
        "layers": fits,
    }
    (args.out / "layer_fit.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
