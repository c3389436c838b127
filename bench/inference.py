"""Prefill and decode speed and peak memory: RAD students vs their softmax teacher.

For each (batch, context) cell and each model:
  prefill  one forward over the context, use_cache=True, logits_to_keep=1 (what generate() runs first);
  decode   from that cache, N greedy steps of one token through the same forward (generate()'s loop,
           minus its logits processors and stopping checks), with the all-ones attention mask that
           generate() passes unless --no-mask.
Models share the GPU (weights are small); reported peaks subtract the other models' weights, so each
peak is what that model alone would allocate.

    python bench/inference.py --out results/            # H100: the default grid within --budget-s
    PYTHONPATH=src python bench/inference.py --tiny     # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    GIB,
    Budget,
    ModelCost,
    Stopwatch,
    add_run_arguments,
    allocated_memory,
    build_student,
    build_teacher,
    decode_floor,
    default_out_dir,
    device_capacity,
    free_memory,
    guarded,
    hybrid_layers,
    markdown_table,
    median,
    peak_memory,
    pick_device,
    prefill_floor,
    reset_peak_memory,
    weight_bytes,
    write_json,
)

COMPILED_TEACHER = "teacher-compiled"
WARMUP_CONTEXTS = (64, 128)  # two lengths: the compiled teacher's second cache length recompiles
# Rows beside each student's own, one flag each: --eager-decode gives rows ARCH-eager, and so on.
STUDENT_VARIANTS = {
    "eager_decode": ("eager", dict(cuda_graph_decode=False)),
    "uncompiled_decode": ("graph", dict(compile_decode=False)),
    "eager_prefill": ("eager-prefill", dict(compile_prefill=False)),
    "one_pass_prefill": ("one-pass", dict(prefill_chunk_tokens=None)),
    "hybrid": ("hybrid", dict(softmax_layers=hybrid_layers)),  # of the teacher's layer count
    "hybrid_window": ("hybrid-window", dict(softmax_layers=hybrid_layers, softmax_window=4096)),
}


def variant_options(options: dict, layers: int) -> dict:
    """`options` for a teacher of `layers` layers: a callable option is called with that count."""
    return {k: v(layers) if callable(v) else v for k, v in options.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="teacher shape (bench/common.py SHAPES)")
    p.add_argument("--archs", default="rad-rwkv7", help="comma-separated students: rad-rwkv7,rad-rwkv6")
    p.add_argument("--contexts", default="1024,4096,16384,32768,65536")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--decode-steps", type=int, default=32, help=">= 1")
    p.add_argument("--decode-warmup", type=int, default=3)
    p.add_argument("--prefill-repeats", type=int, default=3, help="at most; fewer once 2 s are spent")
    p.add_argument("--no-mask", action="store_true", help="call forward without an attention mask")
    for flag, (suffix, options) in STUDENT_VARIANTS.items():
        p.add_argument(
            f"--{flag.replace('_', '-')}",
            action="store_true",
            help=f"also run each student with {options} (rows ARCH-{suffix})",
        )
    p.add_argument(
        "--no-compiled-teacher",
        action="store_true",
        help="leave out the teacher-compiled row (static cache, compiled decoding; CUDA only)",
    )
    p.add_argument("--budget-s", type=float, default=300.0, help="stop adding cells after this")
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip cells estimated above (default: 110%% of the GPU)",
    )
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.contexts, args.batches = "tiny", "64,256", "1,2"
        args.decode_steps, args.prefill_repeats = 4, 2
        args.budget_s = min(args.budget_s, 60.0)
    if args.decode_steps < 1:
        p.error("--decode-steps must be >= 1")
    args.out = args.out or default_out_dir()
    return args


# --------------------------------------------------------------------------- estimates


def estimate_peak_bytes(cost: ModelCost, batch: int, context: int) -> int:
    """Rough prefill peak: weights + KV cache or state + the live activations of one layer (of one
    piece, where the model prefills in pieces).

    Bytes per token, no autograd: a layer peaks either in its MLP (gate, up and their product:
    3 I in bf16) or in its attention; softmax attention holds q/k/v, RoPE temporaries and the output
    (~20 bytes per channel); a RAD mixer holds r/k/v expanded to all heads, fp32 log-decay, a, kappa,
    the mixed k/v and fla's chunk intermediates (~75 bytes per channel). Around them: the residual,
    RMSNorm's fp32 copy (~12 bytes per hidden unit) and, for students, layer 0's v kept for the
    value residual. Good to ~30%: real OOMs are caught and recorded anyway.
    """
    width = cost.heads * cost.head_dim
    mixer = (20 if cost.kind == "softmax" else 75) * width
    persistent = 12 * cost.hidden + (0 if cost.kind == "softmax" else 2 * width)
    per_token = persistent + max(6 * cost.intermediate, mixer)
    cache = batch * cost.kept(context) * cost.kv_bytes_per_token() + batch * cost.state_bytes()
    tokens = min(batch * context, cost.piece_tokens or batch * context)
    return cost.decode_weight_bytes + cache + tokens * per_token


def estimate_seconds(cost: ModelCost, batch: int, context: int, args: argparse.Namespace) -> float:
    """Rough wall time of one model's cell; calibrated against measured cells as the run goes."""
    prefill = prefill_floor(cost, batch, context)["ms"] / 1e3 / 0.3 + cost.layers * 1.5e-3
    timed = min(args.prefill_repeats * prefill, max(prefill, 2.0))
    step = max(decode_floor(cost, batch, context)["ms"] / 1e3 / 0.5, cost.layers * 0.6e-3)
    return prefill + timed + (args.decode_warmup + args.decode_steps) * step


# --------------------------------------------------------------------------- one model, one cell


def returned_cache(out: Any):
    """The cache a forward returned: transformers >= 5.2x and RadladsForCausalLM name it cache, older HF past_key_values."""
    for key in ("cache", "past_key_values"):
        if key in out and out[key] is not None:
            return out[key]
    raise RuntimeError(f"forward returned no cache (keys: {list(out.keys())})")


@functools.cache
def cache_kwarg(forward_fn) -> str:
    """transformers renamed forward's past_key_values to cache (deprecated in 5.2x): use what it takes."""
    return "cache" if "cache" in inspect.signature(forward_fn).parameters else "past_key_values"


def forward(model, ids, mask, cache=None):
    # logits_to_keep=1: generate() passes it too; full prefill logits would be B*T*vocab.
    kwargs = {cache_kwarg(type(model).forward): cache}
    return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)


def static_copy(model, cache, max_len: int):
    """A StaticCache of `max_len` positions holding what the prefill's DynamicCache holds."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, i)
    return static


def compiled_static_step(model):
    """One decoding step through HF's compiled forward over a static cache, positions given. No
    attention mask is passed: the model builds it inside the compiled call from the cache (which
    masks the positions not written yet); generate() builds a 4D mask outside the call instead,
    which may lead SDPA to another kernel."""
    compiled = model.get_compiled_call(None)
    kwarg = cache_kwarg(type(model).forward)

    def step(token, mask, cache, position: int):
        positions = torch.full_like(token, position)
        return compiled(
            input_ids=token, position_ids=positions, use_cache=True, logits_to_keep=1, **{kwarg: cache}
        )

    return step


def release_cudagraph_trees() -> None:
    """Free the memory the compiled teacher's CUDA graphs recorded (pools and cache copies stay
    allocated otherwise, into the next models' and cells' peaks); its compiled code is kept and
    records again in the next cell, which has other shapes anyway."""
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    reset_cudagraph_trees()


def run_model(
    model, ids: torch.Tensor, args: argparse.Namespace, other_bytes: int, row: dict, static: bool = False
) -> None:
    """Time prefill then decode for one model, filling `row` as it goes (an OOM keeps what ran).
    `static`: decode through a StaticCache and HF's compiled step instead (the prefill, the one of
    the teacher's own row, runs once untimed)."""
    device = ids.device
    B, L = ids.shape
    # Compiled steps: compiling, then CUDA-graph trees' warm-up and recording, come first.
    warmup = max(args.decode_warmup, 3) if static else args.decode_warmup
    steps = warmup + args.decode_steps
    mask = None if args.no_mask else torch.ones(B, L + steps, dtype=torch.long, device=device)

    def phase_peak_gb() -> float | None:
        peak = peak_memory(device)
        return None if peak is None else (peak - other_bytes) / GIB

    with torch.no_grad(), contextlib.ExitStack() as stack:
        if not static:  # (the static row times no prefill)
            # The whole prefill once, untimed: a long one may take paths a short one does not (a
            # student's pieces after the first start from a state: another compiled graph).
            forward(model, ids, None if mask is None else mask[:, :L])
        free_memory(device)
        base = allocated_memory(device)
        reset_peak_memory(device)
        out, times = None, []
        while len(times) < (1 if static else max(args.prefill_repeats, 1)) and sum(times) < 2000:
            out = None  # free the previous cache before the next prefill allocates its own
            watch = Stopwatch(device).start()
            out = forward(model, ids, None if mask is None else mask[:, :L])
            times.append(watch.mark().intervals_ms()[0])
        cache = returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        del out

        def step(token, mask, cache, position):
            return forward(model, token, mask, cache)

        if static:
            cache = static_copy(model, cache, L + steps)
            step = compiled_static_step(model)
            stack.callback(release_cudagraph_trees)
        else:
            prefill_ms = median(times)
            row.update(
                prefill_ms=prefill_ms,
                prefill_runs=len(times),
                prefill_tok_s=B * L / (prefill_ms / 1e3),
                prefill_peak_gb=phase_peak_gb(),
            )
        if base is not None:
            row["cache_mb"] = (allocated_memory(device) - base) / 2**20
        row["status"] = "ok (prefill only)"

        reset_peak_memory(device)
        watch = Stopwatch(device)
        for t in range(steps):
            if t == warmup:
                watch.start()
            seen = L + t + 1
            out = step(token, None if mask is None else mask[:, :seen], cache, seen - 1)
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
            del out
            if t >= warmup:
                watch.mark()
        step_ms = watch.intervals_ms()
        total_s = sum(step_ms) / 1e3
        row.update(
            decode_ms=median(step_ms),
            decode_tok_s=B * args.decode_steps / total_s,
            decode_peak_gb=phase_peak_gb(),
            status="ok",
        )


def guarded_run(model, ids, args, other_bytes, row: dict, static: bool = False) -> None:
    """run_model under common.guarded: an OOM or a crash becomes the row's status."""
    guarded(lambda: run_model(model, ids, args, other_bytes, row, static), row, ids.device)
    if row["status"] == "OOM" and "prefill_ms" in row:
        row["status"] = "OOM (decode)"


# --------------------------------------------------------------------------- the grid


def plan(costs, args, device) -> list[dict[str, Any]]:
    capacity = device_capacity(device)
    # Skip only what is clearly too big: estimates are rough, and a real OOM is caught and recorded.
    limit = args.mem_limit_gb * GIB if args.mem_limit_gb else (1.1 * capacity if capacity else None)
    teacher = costs["teacher"]
    cells = []
    for B in (int(b) for b in args.batches.split(",")):
        for L in (int(c) for c in args.contexts.split(",")):
            est = {n: estimate_peak_bytes(c, B, L) for n, c in costs.items()}
            cells.append(
                dict(
                    batch=B,
                    context=L,
                    teacher_kv_gb=B * L * teacher.kv_bytes_per_token() / GIB,
                    logits_mb=B * teacher.vocab * teacher.act_bytes / 2**20,
                    full_logits_gb=B * L * teacher.vocab * teacher.act_bytes / GIB,
                    est_peak_gb={n: b / GIB for n, b in est.items()},
                    too_big=[n for n, b in est.items() if limit is not None and b > limit],
                    est_s=sum(estimate_seconds(c, B, L, args) for c in costs.values()),
                )
            )
    return cells


def print_plan(cells, names) -> None:
    rows = [
        dict(
            B=c["batch"],
            ctx=c["context"],
            **{
                "teacher KV GB": c["teacher_kv_gb"],
                "logits MB": c["logits_mb"],
                "full logits GB": c["full_logits_gb"],
            },
            **{f"est peak GB {n}": c["est_peak_gb"][n] for n in names},
            **{"est s": c["est_s"], "skip (est. OOM)": ",".join(c["too_big"]) or None},
        )
        for c in cells
    ]
    print("\n## Plan (estimates)\n" + markdown_table(rows, list(rows[0])), flush=True)


def cell_peak_gb(row: dict[str, Any]) -> float | None:
    """Peak of the whole request (prefill, then decode)."""
    peaks = [row[k] for k in ("prefill_peak_gb", "decode_peak_gb") if row.get(k) is not None]
    return max(peaks) if peaks else None


def ratios(results: list[dict[str, Any]], students: list[str]) -> list[dict[str, Any]]:
    """Student/teacher per cell, from rows measured in this same run."""
    by_cell: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        by_cell.setdefault((r["batch"], r["context"]), {})[r["model"]] = r
    out = []
    for (B, L), rows in sorted(by_cell.items()):
        t, tc = rows.get("teacher", {}), rows.get(COMPILED_TEACHER, {})
        for s in students:
            st = rows.get(s, {})

            def ratio(key, num=st, den=t):
                a, b = num.get(key), den.get(key)
                return a / b if a is not None and b else None

            peaks = [cell_peak_gb(st), cell_peak_gb(t)]
            out.append(
                dict(
                    batch=B,
                    context=L,
                    student=s,
                    decode_speedup=ratio("decode_tok_s"),
                    decode_speedup_vs_compiled=ratio("decode_tok_s", den=tc),
                    prefill_time_ratio=ratio("prefill_ms"),
                    peak_mem_ratio=peaks[0] / peaks[1] if all(peaks) else None,
                    cache_ratio=ratio("cache_mb"),
                    teacher_status=t.get("status"),
                    student_status=st.get("status"),
                )
            )
    return out


def warm_up(models: dict, args: argparse.Namespace, device, vocab: int) -> list[dict[str, Any]]:
    """Compile and capture every model's decoding for every batch size before the timed cells, at
    two short contexts (the second gives Dynamo's automatic dynamic shapes their recompile for the
    teacher's static cache), so that cells time steady state and the budget calibrates on them.
    Returns how long each took: the wait a user has on a model's first generate() calls."""
    short = argparse.Namespace(**{**vars(args), "decode_steps": 2, "prefill_repeats": 1})
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        for L in WARMUP_CONTEXTS:
            ids = torch.randint(0, vocab, (B, L), device=device)
            for name, model in models.items():
                row: dict[str, Any] = dict(batch=B, context=L, model=name)
                started = time.monotonic()
                guarded_run(model, ids, short, 0, row, static=name == COMPILED_TEACHER)
                rows.append(dict(batch=B, context=L, model=name, seconds=time.monotonic() - started))
                print(
                    f"warm-up B={B} ctx={L} {name}: {row['status']}, {rows[-1]['seconds']:.1f} s", flush=True
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    students = [a for a in args.archs.split(",") if a]

    models = {"teacher": build_teacher(args.shape, device, dtype)}
    if device.type == "cuda" and not args.no_compiled_teacher:
        models[COMPILED_TEACHER] = models["teacher"]  # the same weights, decoded the fastest HF way
    for arch in list(students):
        models[arch] = build_student(models["teacher"], arch)
        for flag, (suffix, options) in STUDENT_VARIANTS.items():
            if getattr(args, flag):
                layers = models["teacher"].config.num_hidden_layers
                models[f"{arch}-{suffix}"] = build_student(
                    models["teacher"], arch, **variant_options(options, layers)
                )
                students.append(f"{arch}-{suffix}")
    costs = {n: ModelCost.of(m) for n, m in models.items()}
    wbytes = {n: weight_bytes(m) for n, m in models.items()}
    print(
        f"device {device}, dtype {dtype}, built models in {budget.elapsed():.1f} s; "
        + ", ".join(f"{n}: {w / 2**20:.0f} MiB" for n, w in wbytes.items()),
        flush=True,
    )

    cells = plan(costs, args, device)
    print_plan(cells, list(models))
    first_use = warm_up(models, args, device, costs["teacher"].vocab)
    results: list[dict[str, Any]] = []
    calibration: list[float] = []
    measured = 0

    def save() -> Path:
        payload = dict(args=vars(args), costs=costs, plan=cells, first_use=first_use, results=results)
        return write_json(args.out, "inference", {**payload, "ratios": ratios(results, students)})

    for cell in sorted(cells, key=lambda c: c["est_s"]):
        B, L = cell["batch"], cell["context"]
        need = cell["est_s"] * (median(calibration) if calibration else 1.0)
        if need > budget.left():
            print(f"B={B} ctx={L}: skipped, ~{need:.0f} s needed, {budget.left():.0f} s left", flush=True)
            results += [dict(batch=B, context=L, model=n, status="skipped (budget)") for n in models]
            continue
        ids = torch.randint(0, costs["teacher"].vocab, (B, L), device=device)
        started = time.monotonic()
        for name, model in models.items():
            row: dict[str, Any] = dict(batch=B, context=L, model=name)
            if name in cell["too_big"]:
                row["status"] = "skipped (est. OOM)"
            else:
                # teacher-compiled is the teacher's object: its weights count once
                others = {id(m): wbytes[n] for n, m in models.items() if m is not model}
                other = sum(others.values())
                guarded_run(model, ids, args, other, row, static=name == COMPILED_TEACHER)
            row["prefill_floor_ms"] = prefill_floor(costs[name], B, L)["ms"]
            row["decode_floor_ms"] = decode_floor(costs[name], B, L)["ms"]
            results.append(row)
            print(
                f"B={B} ctx={L} {name}: {row['status']}, prefill {row.get('prefill_ms', float('nan')):.1f} ms, "
                f"decode {row.get('decode_ms', float('nan')):.2f} ms/step",
                flush=True,
            )
        measured += 1
        if measured > 1:  # the first cell pays one-off autotuning at its shapes: no calibration on it
            calibration.append((time.monotonic() - started) / cell["est_s"])
        del ids
        save()  # after every cell: a run killed from outside keeps what it measured

    path = save()
    show(results, ratios(results, students))
    print(f"\nraw numbers: {path}  (total {budget.elapsed():.0f} s)")


def show(results, ratio_rows) -> None:
    columns = [
        "batch",
        "context",
        "model",
        "prefill_ms",
        "prefill_floor_ms",
        "prefill_tok_s",
        "decode_ms",
        "decode_floor_ms",
        "decode_tok_s",
        "prefill_peak_gb",
        "decode_peak_gb",
        "cache_mb",
        "status",
    ]
    rows = sorted(results, key=lambda r: (r["batch"], r["context"]))
    print("\n## Results\n" + markdown_table(rows, columns))
    print(
        "\n## Student / teacher (same run)\n"
        + markdown_table(ratio_rows, list(ratio_rows[0]) if ratio_rows else [])
    )


if __name__ == "__main__":
    main()
