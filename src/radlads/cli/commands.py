"""What each `radlads` command does, in terms of the library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..convert.layer_choice import auto_count, strongest
from ..convert.pipeline import Conversion, export_checkpoint, resolve_device
from ..convert.presets import preset_steps, preset_student
from ..convert.verify import verify as verify_conversion
from ..data import prepare_shards
from ..data.sources import build_corpus
from ..eval import speed
from ..eval.suite import EvalSettings, evaluate_conversion, load_model
from ..models.configuration import window_overrides
from ..teachers import load_teacher_tokenizer, resolve_teacher
from ..train.config import ConvertConfig


def preset(name: str, teacher: str, random_weights: bool = False) -> tuple[dict[int, dict], dict]:
    """The preset's step settings and student options for this teacher (a folder, .gguf or
    random-weights config)."""
    folder = resolve_teacher(teacher, random_weights=random_weights)
    config = json.loads((folder / "config.json").read_text())
    return preset_steps(name, config), preset_student(name, config)


def convert(cfg: ConvertConfig, steps: tuple[int, ...], progress: bool = True) -> int:
    conversion = Conversion(cfg, progress=progress)
    try:
        out = conversion.run(steps)
    finally:
        conversion.dist.shutdown()
    if not conversion.dist.is_main:
        return 0
    summary = conversion.summary()["steps"]
    cosines = summary.get("0", {}).get("layer_cosines")
    if cosines:
        print("step 0 layer-wise cosine (student mixer vs teacher attention output):")
        print("  " + " ".join("softmax" if c is None else f"{c:.3f}" for c in cosines))
    for k in ("1", "2", "3"):
        if k in summary and summary[k].get("complete"):
            s = summary[k]
            print(
                f"step {k}: {s['tokens']} tokens, loss {s['first_loss']:.4g} -> {s['last_loss']:.4g}, "
                f"held-out {_fmt(s.get('heldout_start'))} -> {_fmt(s.get('heldout_end'))}"
            )
    print(f"student written to {out}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out)
    if args.teacher:
        load_teacher_tokenizer(resolve_teacher(args.teacher)).save_pretrained(out)
    print(f"student written to {out}")
    return 0


def verify(args: argparse.Namespace) -> int:
    findings = verify_conversion(args.out)
    for finding in findings:
        print(finding)
    problems = sum(f.problem for f in findings)
    print(f"{args.out}: {problems} problem(s)" if problems else f"{args.out}: complete and intact")
    return 1 if problems else 0


def prepare_data(args: argparse.Namespace) -> int:
    tokenizer = load_teacher_tokenizer(resolve_teacher(args.teacher))
    texts = list(args.data)
    if args.source:
        texts.append(build_corpus(args.source, args.out / "text", tokenizer=tokenizer))
    if not texts:
        raise ValueError("give text to tokenize: --data FILES/FOLDERS and/or --source NAMES")
    index = prepare_shards(
        texts, tokenizer, args.out, held_out_fraction=args.held_out_fraction, progress=not args.quiet
    )
    splits = ", ".join(
        f"{name}: {s.tokens} tokens in {s.documents} documents" for name, s in index.splits.items()
    )
    print(f"shards written to {args.out} ({splits})")
    return 0


def generate(args: argparse.Namespace) -> int:
    import radlads  # noqa: F401  (registers the student architecture with the Auto classes)

    device = resolve_device(args.device)
    window = window_overrides(args.model, args.softmax_window, args.softmax_sinks)
    model = AutoModelForCausalLM.from_pretrained(args.model, **window).to(device).eval()
    # One prompt: compiling would take longer than the tokens it speeds up.
    model.config.compile_decode = model.config.compile_prefill = args.compile
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = (
        dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, **sampling)
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import ServeConfig
        from ..serve import serve as run_server
    except ImportError as error:
        raise RuntimeError(f"radlads serve needs its extra ({error}): pip install 'radlads[serve]'") from None

    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        api_key=args.api_key,
        model_name=args.model_name,
        prefix_cache_bytes=args.prefix_cache_mb << 20,
        warm_up=not args.no_warm_up,
        max_state_bytes=None if args.max_state_gb is None else int(args.max_state_gb * 1e9),
        softmax_window=args.softmax_window,
        softmax_sinks=args.softmax_sinks,
    )
    run_server(args.model, config, args.device)
    return 0


def _eval_settings(args: argparse.Namespace, default_heldout: Path) -> EvalSettings:
    return EvalSettings(
        heldout=args.data or (str(default_heldout) if (default_heldout / "index.json").is_file() else None),
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        task_dir=args.tasks_dir,
        tasks=args.tasks,
        limit=args.limit,
        passkey_lengths=args.passkey,
        copy_distances=args.copy,
        speed_contexts=args.speed,
        compile=args.compile,
        softmax_window=args.softmax_window,
        softmax_sinks=args.softmax_sinks,
    )


def eval(args: argparse.Namespace) -> int:  # noqa: A001  (the command's name)
    teacher = resolve_teacher(args.teacher) if args.teacher else None
    settings = _eval_settings(args, Path(args.model) / "data")
    report = evaluate_conversion(
        args.model,
        teacher,
        args.out or Path(args.model) / "eval",
        settings,
        resolve_device(args.device),
        progress=not args.quiet,
    )
    print(report.read_text())
    print(f"report written to {report}")
    return 0


def bench_generate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    rows = []
    for name, path in (("student", args.model), ("teacher", args.teacher and resolve_teacher(args.teacher))):
        if path:
            model = load_model(path, device)
            rows += [
                {"model": name, **r}
                for r in speed.bench_generate(model, args.contexts, args.batch_size, args.new_tokens)
            ]
            del model
    print(f"{'model':8} {'context':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MB':>9}")
    for r in rows:
        print(
            f"{r['model']:8} {r['context_length']:>8} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
            f"{float('nan') if r['peak_memory_mb'] is None else r['peak_memory_mb']:>9.0f}"
        )
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.arch, resolve_device(args.device), progress=not args.quiet)


def _local_gpu_memory_gb(default: float = 80.0) -> float:
    """The total memory of this machine's first GPU in GB of 1e9 bytes, or `default` without one."""
    if not torch.cuda.is_available():
        return default
    return torch.cuda.get_device_properties(0).total_memory / 1e9


def _planned_softmax(args: argparse.Namespace) -> tuple[tuple[int, ...], int | None]:
    """The softmax layers and window `plan` sizes: as given, else as `convert --preset auto` shapes
    the student; auto:N as any N layers (memory does not depend on which), checked as convert
    checks N."""
    from ..convert.plan import load_config

    teacher_config = load_config(args.teacher).to_dict()
    layers, window = args.softmax_layers, args.softmax_window
    if layers is None:
        student = preset_student("auto", teacher_config)
        layers, window = student.get("softmax_layers", []), window or student.get("softmax_window")
    n = auto_count(layers)
    if n is not None:
        layers = strongest([0.0] * teacher_config["num_hidden_layers"], n)
    return tuple(layers), window


def plan(args: argparse.Namespace) -> int:
    from ..convert.plan import plan as make_plan

    if args.gpu_memory_gb is None:
        args.gpu_memory_gb = round(_local_gpu_memory_gb(), 1)
    softmax_layers, softmax_window = _planned_softmax(args)
    options = dict(
        softmax_layers=softmax_layers,
        softmax_window=softmax_window,
        softmax_sinks=args.softmax_sinks,
        keep_kernel_intermediates=args.keep_kernel_intermediates,
        tilelang=args.tilelang,
    )
    result = make_plan(
        args.teacher,
        arch=args.arch,
        gpu_memory_gb=args.gpu_memory_gb,
        seq_len=args.seq_len or 512,
        step3_seq_len=args.step3_seq_len,
        batch_size=args.batch_size or 8,
        optimizer=args.optimizer,
        **options,
    )
    print(result.to_markdown(), end="")
    print(one_gpu_table(args, options, result.step3_seq_len))
    print("", *result.decode_table(), sep="\n")
    return 0


def _convert_steps(args: argparse.Namespace, step3_seq_len: int) -> dict:
    """Steps 1-3 as `radlads convert --preset auto` sets them for this teacher, with plan's flags
    (sequence lengths, batch sizes) over the preset's."""
    from ..convert.plan import load_config
    from ..train.config import StepConfig

    preset = preset_steps("auto", load_config(args.teacher).to_dict())
    flags = dict(seq_len=args.seq_len, global_batch_size=args.global_batch_size, batch_size=args.batch_size)
    if args.batch_size and args.global_batch_size:  # as convert: accumulation makes up the global batch
        accum, rest = divmod(args.global_batch_size, args.batch_size)
        if rest or not accum:
            raise ValueError(
                f"--global-batch-size {args.global_batch_size} is not --batch-size {args.batch_size} x a "
                "whole number of accumulated micro-batches: make it a multiple"
            )
        flags["grad_accum"] = accum
    given = {1: flags, 2: flags, 3: dict(seq_len=step3_seq_len)}
    return {
        k: StepConfig(**{"tokens": 0, "lr": 0.0, **preset[k], **{f: v for f, v in given[k].items() if v}})
        for k in (1, 2, 3)
    }


def one_gpu_table(args: argparse.Namespace, options: dict, step3_seq_len: int) -> str:
    """Per step, the micro-batch, optimizer and activation checkpointing that `radlads convert`
    runs with on one GPU of --gpu-memory-gb, as its own sizing chooses them (convert.batching)."""
    from ..convert.batching import CUDA_CONTEXT_BYTES, USABLE_FRACTION, one_gpu_settings
    from ..convert.plan import GB
    from ..train.optimizers import installed

    lines = [
        "",
        f"On one GPU of {args.gpu_memory_gb:g} GB ({CUDA_CONTEXT_BYTES / GB:g} GB for the CUDA context, "
        f"{USABLE_FRACTION:.0%} of the rest usable, as convert sizes a step):",
        "",
        "| step | micro-batch x accumulated | optimizer | act. ckpt | estimated peak GB | fits |",
        "|---|---|---|---|---:|---|",
    ]
    steps, gpu_bytes = _convert_steps(args, step3_seq_len), args.gpu_memory_gb * GB - CUDA_CONTEXT_BYTES

    def sized(checkpointing: bool | None) -> dict:
        return {
            k: one_gpu_settings(args.teacher, args.arch, k, cfg, gpu_bytes, checkpointing, **options)
            for k, cfg in steps.items()
        }

    settings = sized(None)
    checkpointing = any(ckpt for ckpt, _ in settings.values())
    if checkpointing:  # convert's switch covers the whole run: where one step needs it, all run with it
        settings = sized(True)
    missing = set()
    for step, cfg in steps.items():
        choice = settings[step][1]
        lines.append(
            f"| {step} | {choice.micro_batch} x {cfg.seq_len} x {choice.grad_accum} | {choice.optimizer} | "
            f"{'yes' if checkpointing else 'no'} | {choice.estimated_peak_gb:.1f} | "
            f"{'yes' if choice.fits else 'no: more GPUs (--nproc)'} |"
        )
        missing |= {choice.optimizer} - set(installed())
    if checkpointing:
        lines += [
            "",
            "Activation checkpointing is one switch for the whole run: `convert --activation-checkpointing`.",
        ]
    if missing:
        lines += ["", f"radlads[torchao] (not installed here) provides {', '.join(sorted(missing))}."]
    return "\n".join(lines)
