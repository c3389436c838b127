"""The two student recurrences, kernel against kernel, on identical inputs.

    rwkv7  h_t = diag(w_t) h + b_t (a_t^T h) + k_t v_t^T     (fla chunk_rwkv7 / fused_recurrent_rwkv7)
    gla    h_t = diag(w_t) h + k_t v_t^T                      (fla chunk_gla / fused_recurrent_gla)

Methods: fla's chunk kernel (for RWKV-7 also with RAD-RWKV7's decay floor, `fla chunk + floor`:
what that student runs for prefill and training), fla's fused
recurrent kernel (what they run for decoding, <= 16 tokens), and radlads' PyTorch chunked
reference in fp32. Modes: forward (prefill-like, no autograd), forward+backward (training), and a
single decode step (T=1 from a carried state). Inputs are built like the mixers build them (decay
range, normalised removal key, k tied to decay) and passed the way radlads.kernels.fla_ops passes
them (bf16, log-decay cast to bf16, fp32 state); the reference gets the same values in fp32.

    python bench/recurrence_kernels.py --out results/
    PYTHONPATH=src python bench/recurrence_kernels.py --tiny      # CPU: reference rows only
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    Budget,
    add_run_arguments,
    default_out_dir,
    free_memory,
    markdown_table,
    median,
    pick_device,
    time_ms,
    write_json,
)
from torch import Tensor

from radlads.kernels import fla_available, gla_recurrence, rwkv7_recurrence
from radlads.models.rwkv7 import LOG_W_MIN

Inputs = dict[str, Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=16, help="batch of the T=1 decode-step rows")
    p.add_argument(
        "--ref-tokens",
        type=int,
        default=None,
        help="prefix the fp32 reference runs on (default: all tokens); outputs are causal, "
        "so every method is compared on this prefix",
    )
    p.add_argument("--rules", default="rwkv7,gla")
    p.add_argument(
        "--training-options",
        action="store_true",
        help="also RWKV-7 rows of fla's options for training: intermediates kept, 32-token chunks",
    )
    p.add_argument(
        "--methods",
        default="",
        help="comma-separated method names to run (default: all; the reference always)",
    )
    p.add_argument("--budget-s", type=float, default=90.0)
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.tokens, args.heads, args.head_dim, args.decode_batch = 2, 64, 2, 16, 2
        args.budget_s = min(args.budget_s, 60.0)
    args.ref_tokens = min(args.ref_tokens or args.tokens, args.tokens)
    args.out = args.out or default_out_dir()
    return args


# --------------------------------------------------------------------------- inputs


def make_inputs(rule: str, B: int, T: int, H: int, K: int, device, seed: int = 0) -> Inputs:
    """bf16 inputs shaped like the mixers' (fp32 log-decay rounded to bf16 as fla_ops does)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x: Inputs = {"r": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, K)}
    # Per-channel decay speeds spread like the students' init schedules, plus data dependence.
    speed = torch.linspace(-6.0, -1.0, K, device=device)
    if rule == "rwkv7":
        d = speed + 0.5 * rnd(B, T, H, K)
        x["log_w"] = -torch.exp(-0.5 - F.softplus(-d))  # RAD-RWKV7: w in (0.545, 1)
        kappa = F.normalize(rnd(B, T, H, K), dim=-1)
        iclr = torch.sigmoid(rnd(B, T, H, K))
        x["a"], x["b"] = -kappa, kappa * iclr
    else:
        x["log_w"] = -torch.exp(speed + 0.5 * rnd(B, T, H, K))  # RAD-RWKV6
        x["k"] = x["k"] * -torch.expm1(x["log_w"])  # key tied to decay: k (1 - w)
    return {n: t.to(torch.bfloat16) for n, t in x.items()}


def ordered(rule: str, x: Inputs) -> list[Tensor]:
    names = ["r", "log_w", "k", "v"] + (["a", "b"] if rule == "rwkv7" else [])
    return [x[n] for n in names]


# --------------------------------------------------------------------------- methods


def fla_op(rule: str, kind: str, log_w_min: float | None = None, **options) -> Callable:
    """fla's kernels called as radlads.kernels.fla_ops calls them (fla is imported lazily: CUDA only);
    `log_w_min`: the decay floor RAD-RWKV7 declares (chunk_rwkv7's lower_bound); `options`: more
    of chunk_rwkv7's arguments."""
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    def run(r, log_w, k, v, a=None, b=None, *, scale, initial_state=None, output_final_state=False):
        state = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
        if rule == "gla":
            if kind == "chunk":
                return chunk_gla(r, k, v, log_w, **state)
            return fused_recurrent_gla(r, k, v, gk=log_w, **state)
        if kind == "chunk":
            return chunk_rwkv7(r, log_w, k, v, a, b, lower_bound=log_w_min, **options, **state)
        return fused_recurrent_rwkv7(r, log_w, k, v, a, b, **state)

    return run


def reference_op(rule: str, backend: str) -> Callable:
    """radlads' own PyTorch path (fp32 inside), through the public dispatcher."""
    recurrence = rwkv7_recurrence if rule == "rwkv7" else gla_recurrence

    def run(*args, **kwargs):
        return recurrence(*args, backend=backend, **kwargs)

    return run


# chunk_rwkv7's options that trade memory or work in training (with the floor, as RAD-RWKV7 runs)
TRAINING_OPTIONS = {
    "fla chunk + floor + kept": dict(disable_recompute=True),  # keep_kernel_intermediates
    "fla chunk + floor + chunk 32": dict(chunk_size=32),
    "fla chunk + floor + chunk 32 + kept": dict(chunk_size=32, disable_recompute=True),
}


def methods(rule: str, device, training_options: bool = False) -> dict[str, Callable | str]:
    """name -> op, or a reason string when it cannot run here."""
    fla = fla_available() and device.type == "cuda"
    why = "n/a: fla needs CUDA + flash-linear-attention"
    found = {"fla chunk": fla_op(rule, "chunk") if fla else why}
    if rule == "rwkv7":  # what RAD-RWKV7 runs: 64-token chunks licensed by its decay floor
        found["fla chunk + floor"] = fla_op(rule, "chunk", LOG_W_MIN) if fla else why
        for name, options in TRAINING_OPTIONS.items() if training_options else ():
            found[name] = fla_op(rule, "chunk", LOG_W_MIN, **options) if fla else why
    found["fla fused_recurrent"] = fla_op(rule, "fused_recurrent") if fla else why
    found["torch chunked fp32"] = reference_op(rule, "chunked")
    return found


# --------------------------------------------------------------------------- measurements


def rel_err(x: Tensor, ref: Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def io_bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_forward(op, args: list[Tensor], scale: float, state: Tensor | None, device) -> dict[str, Any]:
    def run():
        return op(*args, scale=scale, initial_state=state, output_final_state=True)

    with torch.no_grad():
        times = time_ms(run, device, warmup=2, repeats=10, max_total_s=1.0)
        y, h = run()
    moved = io_bytes(*args, state, y, h)  # each input read once, output and final state written once
    ms = median(times)
    return {"ms": ms, "gb_s": moved / ms / 1e6, "y": y}


def measure_backward(op, args: list[Tensor], scale: float, device) -> dict[str, Any]:
    leaves = [a.detach().clone().requires_grad_() for a in args]
    dy = torch.randn_like(args[3])

    def run():
        y, _ = op(*leaves, scale=scale, output_final_state=True)
        return torch.autograd.grad(y, leaves, dy)

    times = time_ms(run, device, warmup=2, repeats=10, max_total_s=1.0)
    inputs, outputs = io_bytes(*args), io_bytes(dy)
    # forward: inputs in, y out; backward: inputs and dy in, one gradient per input out
    moved = (inputs + outputs) + (inputs + outputs) + inputs
    ms = median(times)
    return {"ms": ms, "gb_s": moved / ms / 1e6}


def gradients(op, args: list[Tensor], scale: float, upto: int, seed: int = 1) -> list[Tensor]:
    """Input gradients of <y[:, :upto], dy> (dy fixed by seed): causal, so a run on the first `upto`
    tokens and a run on all tokens give the same gradients there."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y, _ = op(*leaves, scale=scale)
    dy = torch.zeros_like(y)
    dy[:, :upto] = torch.randn(dy[:, :upto].shape, generator=g).to(dy)
    return [gr[:, :upto] for gr in torch.autograd.grad(y, leaves, dy)]


def bench_rule(
    rule: str, args: argparse.Namespace, device, budget: Budget, save: Callable
) -> list[dict[str, Any]]:
    B, T, H, K, Tr = args.batch, args.tokens, args.heads, args.head_dim, args.ref_tokens
    scale = K**-0.5
    x = ordered(rule, make_inputs(rule, B, T, H, K, device))
    ref_x = [t[:, :Tr].float() for t in x]
    ops = methods(rule, device, args.training_options)
    ref_op = ops["torch chunked fp32"]
    if args.methods:  # each fla method's first call compiles and autotunes its kernels: minutes
        chosen = set(args.methods.split(","))
        ops = {name: op for name, op in ops.items() if name in chosen or op is ref_op}
    with torch.no_grad():
        y_ref, _ = ref_op(*ref_x, scale=scale)
    g_ref = gradients(ref_op, ref_x, scale, Tr)

    rows = []
    for name, op in ops.items():
        is_ref = name.startswith("torch")
        inputs, tokens = (ref_x, Tr) if is_ref else (x, T)
        for mode in ("fwd", "fwd+bwd"):
            row: dict[str, Any] = dict(rule=rule, method=name, mode=mode, B=B, T=tokens, H=H, K=K)
            rows.append(row)
            if isinstance(op, str):
                row["note"] = op
                continue
            if budget.left() <= 0:
                row["note"] = "skipped (budget)"
                continue
            try:
                if mode == "fwd":
                    m = measure_forward(op, inputs, scale, None, device)
                    row["rel_err"] = rel_err(m.pop("y")[:, :Tr], y_ref)
                else:
                    m = measure_backward(op, inputs, scale, device)
                    grads = gradients(op, inputs, scale, Tr)
                    row["rel_err"] = max(rel_err(gr[:, :Tr], gref) for gr, gref in zip(grads, g_ref))
                row.update(m)
            except NotImplementedError as e:  # fla's fused recurrent rwkv7 kernel has no backward
                row["note"] = f"n/a: {str(e)[:60]}"
            except Exception as e:  # report and go on: the GPU run is a single timed call
                traceback.print_exc()
                row["note"] = f"error: {type(e).__name__}: {str(e)[:80]}"
            free_memory(device)
            save(rows)  # each first call of a kernel compiles and autotunes: a timeout keeps the rest
    rows += bench_decode_step(rule, args, device, budget)
    return rows


def bench_decode_step(rule: str, args: argparse.Namespace, device, budget: Budget) -> list[dict[str, Any]]:
    """One token from a carried state: the per-layer recurrence cost of a decode step."""
    B, H, K = args.decode_batch, args.heads, args.head_dim
    scale = K**-0.5
    x = ordered(rule, make_inputs(rule, B, 1, H, K, device, seed=2))
    g = torch.Generator(device="cpu").manual_seed(3)
    state = (0.1 * torch.randn(B, H, K, K, generator=g)).to(device)
    with torch.no_grad():
        y_ref, _ = reference_op(rule, "loop")(*[t.float() for t in x], scale=scale, initial_state=state)
    ops = {**methods(rule, device), "torch loop fp32": reference_op(rule, "loop")}
    rows = []
    for name, op in ops.items():
        row: dict[str, Any] = dict(rule=rule, method=name, mode="decode step", B=B, T=1, H=H, K=K)
        rows.append(row)
        if isinstance(op, str) or budget.left() <= 0:
            row["note"] = op if isinstance(op, str) else "skipped (budget)"
            continue
        inputs = [t.float() for t in x] if name.startswith("torch") else x
        try:
            m = measure_forward(op, inputs, scale, state, device)
            row["rel_err"] = rel_err(m.pop("y"), y_ref)
            row.update(m)
        except Exception as e:
            traceback.print_exc()
            row["note"] = f"error: {type(e).__name__}: {str(e)[:80]}"
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = pick_device(args.device)
    rows: list[dict[str, Any]] = []

    def save(more: list[dict[str, Any]]):
        return write_json(args.out, "recurrence_kernels", dict(args=vars(args), results=rows + more))

    for rule in args.rules.split(","):
        rows += bench_rule(rule, args, device, budget, save)
    path = save([])
    columns = ["rule", "method", "mode", "B", "T", "H", "K", "ms", "gb_s", "rel_err", "note"]
    print(
        "\n## Recurrence kernels (rel_err: vs fp32 chunked reference on the first "
        f"{args.ref_tokens} tokens; decode step: vs fp32 loop)\n" + markdown_table(rows, columns)
    )
    print(f"\nraw numbers: {path}  (total {budget.elapsed():.0f} s)")


if __name__ == "__main__":
    main()
