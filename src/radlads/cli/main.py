"""`radlads` console script: convert, step0..step3, export, verify, prepare-data, eval, generate, serve,
plan."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

import transformers

from ..convert.layer_choice import auto_count
from ..convert.presets import PRESET_NAMES
from ..train.config import ConvertConfig, parse_tokens, read_yaml
from ..train.optimizers import OPTIMIZERS
from . import commands


def parse_layers(value: str) -> list[int] | str:
    """--softmax-layers: "10,20", "auto:2" (its N is checked against the teacher's layers later), or
    "none" for a pure student."""
    try:
        if value == "none":
            return []
        if value.startswith("auto"):
            auto_count(value)
            return value
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give layer numbers (e.g. 10,20), auto:N or none"
        ) from None


def _add_window_args(
    p: argparse.ArgumentParser, default: str = "the window the model was saved with"
) -> None:
    p.add_argument(
        "--softmax-window",
        type=parse_tokens,
        help="the softmax layers attend to the last N tokens and the first few (--softmax-sinks): a KV "
        f"cache of N + sinks tokens, constant decoding memory (default: {default})",
    )
    p.add_argument("--softmax-sinks", type=int, help="with --softmax-window: first tokens always seen (4)")


def _add_conversion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of ConvertConfig fields; flags override it")
    p.add_argument("--teacher", help="teacher: HF model folder, .gguf file, or folder holding one")
    p.add_argument("--data", help="text folder/file (.txt, .jsonl, .gz, .xz) or a prepared shard folder")
    p.add_argument("--out", help="output folder (re-running with the same --out resumes)")
    p.add_argument("--arch", choices=["rad-rwkv7", "rad-rwkv6"])
    p.add_argument(
        "--preset",
        help="batch sizes and recipe by teacher size: auto (default without --config: from the "
        "teacher's size) or " + ", ".join(PRESET_NAMES[1:]),
    )
    p.add_argument(
        "--softmax-layers",
        type=parse_layers,
        help="comma-separated layers that keep softmax attention (negative counts from the end), "
        "auto:N for the N layers with the teacher's strongest induction heads, or none for a pure "
        "student (default: the preset's; --preset auto keeps auto:2, windowed at step 3's length, "
        "for teachers under 1B parameters with 16 layers or more, and no layer for others)",
    )
    _add_window_args(p, default="the whole context, or the preset's with its layers")
    small = "under --preset auto for teachers under 1B parameters"
    budgets = {1: "100M", 2: "250M", 3: f"0; 10M {small}"}
    new_lr_scales = {1: "1", 2: f"1; 10 {small}", 3: "1"}
    for k in (1, 2, 3):
        p.add_argument(
            f"--step{k}-tokens",
            type=parse_tokens,
            help=f"token budget of step {k} (k/M/B suffixes; default {budgets[k]})",
        )
        p.add_argument(f"--step{k}-lr", type=float, help=f"peak learning rate of step {k}")
        p.add_argument(
            f"--step{k}-new-lr-scale",
            type=float,
            help=f"step {k}'s LR multiplier for the parameters step 0 creates (decay, in-context rate, "
            f"value residual, gate; default {new_lr_scales[k]})",
        )
        p.add_argument(
            f"--step{k}-repeat-fraction",
            type=float,
            help=f"fraction of step {k}'s training windows shown as a span of text twice, so that the "
            "student learns to copy from context as its teacher does (default 0)",
        )
    p.add_argument(
        "--seq-len", type=int, help=f"sequence length of steps 1 and 2 (default 512; 2048 in step 2 {small})"
    )
    p.add_argument(
        "--step3-seq-len",
        type=int,
        help="sequence length of step 3 (default: the teacher's trained context, at most 16384)",
    )
    p.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per optimizer update (steps 1 and 2); the micro-batch is fitted to the GPU",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="sequences per micro-batch (steps 1 and 2), instead of the largest that fits the GPU; "
        "with --global-batch-size, accumulation makes up the rest, else each update is "
        "--batch-size x --grad-accum sequences",
    )
    p.add_argument("--grad-accum", type=int, help="with --batch-size: micro-batches per optimizer update")
    p.add_argument("--checkpoint-every", type=parse_tokens, help="tokens between checkpoints")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument(
        "--optimizer",
        choices=("auto", *OPTIMIZERS),
        help="steps 1-3 (default auto: the most precise whose memory estimate fits the GPU; "
        "adamw-bf16-state and adamw-8bit need radlads[torchao])",
    )
    p.add_argument(
        "--random-teacher-weights",
        action="store_true",
        default=None,
        help="--teacher holds a config.json only: build it with random weights on the device "
        "(throughput runs at a model's exact shape; the student learns nothing useful)",
    )
    p.add_argument(
        "--keep-kernel-intermediates",
        action="store_true",
        default=None,
        help="RAD-RWKV7 on CUDA: faster backward for ~2.2 KB more memory per token, head and layer",
    )
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="no torch.compile on CUDA (default: the student's layers and the losses' vocab-wide terms)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes (one per GPU): re-launches this command under torchrun",
    )


def _lengths(text: str) -> tuple[int, ...]:
    return tuple(parse_tokens(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radlads", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    p = add("convert", help="run steps 0-3 (skipping finished ones) and write an HF model folder")
    _add_conversion_args(p)
    for k in range(4):
        p = add(f"step{k}", help=f"run only step {k} in --out")
        _add_conversion_args(p)

    p = add("export", help="write a mid-step (sharded) checkpoint's student as a Hugging Face folder")
    p.add_argument("--checkpoint", required=True, type=Path, help="e.g. OUT/checkpoints/step2")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument("--teacher", help="also copy this teacher's tokenizer into --out")

    p = add("verify", help="check a conversion folder: config, weights, tokenizer, checkpoints, hashes")
    p.add_argument("out", type=Path, help="the folder a `radlads convert --out` wrote")

    p = add("prepare-data", help="tokenize text with the teacher's tokenizer into reusable shards")
    p.add_argument("--teacher", required=True, help="teacher whose tokenizer to use")
    p.add_argument("--data", nargs="+", default=[], help="text files or folders")
    p.add_argument(
        "--source",
        nargs="+",
        default=[],
        help="corpus sources to fetch from Debian packages "
        "(radlads.data.sources.SOURCES, e.g. gcide wordnet python-docs fortunes), built into OUT/text",
    )
    p.add_argument("--out", required=True, type=Path, help="shard folder to write")
    p.add_argument("--held-out-fraction", type=float, default=0.01)

    p = add("eval", help="score student and teacher side by side; write report.md with ratios and plots")
    p.add_argument("--model", required=True, help="student folder (a radlads convert --out)")
    p.add_argument("--teacher", help="teacher folder or .gguf (omit to score the student alone)")
    p.add_argument("--data", help="held-out text or shard folder (default: the run's own held-out split)")
    p.add_argument(
        "--tasks-dir",
        help="folder of <task>.jsonl files in lm-evaluation-harness' shapes (default: no zero-shot tasks)",
    )
    p.add_argument("--tasks", type=lambda s: s.split(","), help="comma-separated subset of tasks")
    p.add_argument("--limit", type=count, help="at most this many documents per task")
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity window length")
    p.add_argument("--max-windows", type=count, default=64)
    p.add_argument("--passkey", type=_lengths, default=(), help="passkey context lengths, e.g. 1k,4k,16k")
    p.add_argument(
        "--copy",
        type=_lengths,
        default=(),
        help="copying probes: tokens between a random span and its repeat, e.g. 0,256,1k (0 counts)",
    )
    _add_window_args(p)
    p.add_argument("--speed", type=_lengths, default=(), help="bench-generate context lengths, e.g. 1k,4k")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile a student's prefill and decoding as its config says (on anyway with --speed); "
        "by default off: compiling takes 1-2 min on a GPU, long beside scoring's short generations",
    )
    p.add_argument("--out", type=Path, help="report folder (default: MODEL/eval)")
    p.add_argument("--device", default="auto")

    p = add("bench-generate", help="prefill/decode tokens/s and peak memory, student vs teacher, same run")
    p.add_argument("--model", required=True)
    p.add_argument("--teacher")
    p.add_argument("--contexts", type=_lengths, default=(1024, 4096, 16384, 32768, 65536))
    p.add_argument("--batch-size", type=count, default=1)
    p.add_argument("--new-tokens", type=count, default=128)
    p.add_argument("--device", default="auto")

    p = add("demo", help="the whole pipeline on the bundled SmolLM2-135M teacher and sample text")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--arch", choices=["rad-rwkv7", "rad-rwkv6"], default="rad-rwkv7")
    p.add_argument("--device", default="auto")

    p = add("plan", help="parameter counts and per-step GPU memory / GPU count, from config.json alone")
    p.add_argument("--teacher", required=True, help="teacher folder holding config.json, or its path")
    p.add_argument("--arch", choices=["rad-rwkv7", "rad-rwkv6"], default="rad-rwkv7")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="memory of one GPU in GB of 1e9 bytes: nvidia-smi's MiB x 0.001048576 (an H200's 143,771 "
        "MiB are 150.8 GB; an H100's 81,559 are 85.5). Default: this machine's GPU, else 80",
    )
    p.add_argument(
        "--seq-len",
        type=count,
        help="sequence length of steps 1 and 2 (default: convert's for this teacher in the one-GPU "
        "table, 512 in the table of GPU counts)",
    )
    p.add_argument(
        "--step3-seq-len",
        type=count,
        help="default: the teacher's trained context, up to 16384, as convert runs it",
    )
    p.add_argument(
        "--batch-size",
        type=count,
        help="sequences per micro-batch (steps 1 and 2; default: the largest that fits one GPU, as "
        "convert chooses it, and 8 in the table of GPU counts)",
    )
    p.add_argument(
        "--global-batch-size",
        type=count,
        help="sequences per optimizer update (steps 1 and 2; default: convert's for this teacher)",
    )
    p.add_argument(
        "--softmax-layers",
        type=parse_layers,
        help="comma-separated layers that keep softmax attention, auto:N or none (default: as "
        "`radlads convert --preset auto` shapes the student)",
    )
    _add_window_args(p, default="the whole context, or the preset's with its layers")
    p.add_argument(
        "--keep-kernel-intermediates",
        action="store_true",
        help="count fla's kept RWKV-7 intermediates, as convert --keep-kernel-intermediates trains",
    )
    p.add_argument(
        "--tilelang",
        action="store_true",
        help="count those of fla's TileLang kernels (radlads[tilelang] installed), not its Triton ones",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="the table's optimizer state; the one-GPU recommendation below it tries each",
    )

    p = add("serve", help="OpenAI-compatible HTTP server (continuous batching) for a student or teacher")
    p.add_argument("--model", required=True, help="model folder: a student, a hybrid or a plain HF teacher")
    _add_window_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="requests decoding at once; more wait")
    p.add_argument("--max-prompt-tokens", type=int, default=32768, help="longer prompts are refused")
    p.add_argument("--max-new-tokens", type=int, default=8192, help="larger max_tokens are refused")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: open)")
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument(
        "--prefix-cache-mb", type=int, default=1024, help="memory for cached prefix states; 0 turns it off"
    )
    p.add_argument(
        "--max-state-gb",
        type=float,
        help="memory for the running requests' states and KV caches, each counted at its max_tokens: "
        "later requests wait (default: no limit)",
    )
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="start serving at once; the first steps at each new batch size then wait for its compile",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")

    p = add("generate", help="generate text with a student (constant memory per token)")
    p.add_argument("--model", required=True)
    _add_window_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=count, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the prefill's layers and the CUDA decoding step first (~1-2 min on CUDA; "
        "pays off after thousands of tokens)",
    )
    p.add_argument("--device", default="auto")
    return parser


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    """The preset, then what the YAML (if any) writes, then explicit flags: later sources win."""
    data, written = {}, {}
    if args.config:
        written = read_yaml(args.config)
        data = ConvertConfig.from_dict(written).to_dict()
    switches = ("activation_checkpointing", "keep_kernel_intermediates", "compile", "random_teacher_weights")
    for key in ("teacher", "data", "out", "arch", "device", "seed") + switches:
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    student = {
        "softmax_layers": args.softmax_layers,
        "softmax_window": args.softmax_window,
        "softmax_sinks": args.softmax_sinks,
    }
    data.setdefault("student", {}).update({k: v for k, v in student.items() if v is not None})
    for key in ("teacher", "data", "out"):
        if not data.get(key):
            raise ValueError(f"--{key} is required (or set `{key}:` in --config)")
    steps = {k: dict(data.get(f"step{k}", {})) for k in (1, 2, 3)}
    preset = args.preset or (None if args.config else "auto")  # a YAML config says all itself
    if preset:
        random_weights = data.get("random_teacher_weights", False)
        by_step, student_shape = commands.preset(preset, data["teacher"], random_weights)
        for k, values in by_step.items():
            steps[k].update(values)
            steps[k].update(written.get(f"step{k}") or {})
        if "softmax_layers" not in data["student"]:  # the preset's shape unless the layers are named
            data["student"] = {**student_shape, **data["student"]}
    for k in (1, 2, 3):
        flags = {
            "tokens": getattr(args, f"step{k}_tokens"),
            "lr": getattr(args, f"step{k}_lr"),
            "new_lr_scale": getattr(args, f"step{k}_new_lr_scale"),
            "repeat_fraction": getattr(args, f"step{k}_repeat_fraction"),
            "checkpoint_every": args.checkpoint_every,
            "seq_len": args.seq_len if k < 3 else args.step3_seq_len,
            "global_batch_size": args.global_batch_size if k < 3 else None,
            "batch_size": args.batch_size if k < 3 else None,
            "grad_accum": accumulation(args) if k < 3 else None,
            "optimizer": args.optimizer,
        }
        steps[k].update({key: v for key, v in flags.items() if v is not None})
        data[f"step{k}"] = steps[k]
    return ConvertConfig.from_dict(data)


def count(text: str) -> int:
    """A number of things (documents, windows, tokens, sequences), checked before a model loads."""
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a count: give 1 or more")
    return number


def port_number(text: str) -> int:
    """A TCP port, checked before the model loads (0 lets the OS pick one)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give 0 to 65535")
    return port


def accumulation(args: argparse.Namespace) -> int | None:
    """Micro-batches per update where the micro-batch and the global batch are both given: the
    global batch the user asked for, kept (each update would otherwise be one micro-batch)."""
    if args.batch_size is None or args.global_batch_size is None:
        return args.grad_accum
    processes = int(os.environ.get("WORLD_SIZE", getattr(args, "nproc", None) or 1))
    accum, rest = divmod(args.global_batch_size, args.batch_size * processes)
    if rest or not accum or args.grad_accum not in (None, accum):
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not --batch-size {args.batch_size} x "
            f"{processes} process(es) x a whole --grad-accum: make it a multiple"
            + (f", or leave out --grad-accum {args.grad_accum}" if args.grad_accum else "")
        )
    return accum


def under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `radlads ARGV` as `torchrun --standalone --nproc-per-node NPROC -m radlads ARGV`, less
    --nproc (torchrun's own parser would take it for an abbreviation of --nproc-per-node)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    worker_argv = []
    args = iter(argv)
    for arg in args:
        if arg == "--nproc":
            next(args)
        elif not arg.startswith("--nproc="):
            worker_argv.append(arg)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "radlads", *worker_argv])
    except ChildFailedError:
        return 1  # torchrun has printed which process failed; each printed its own error
    return 0


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and nproc != launched:
        raise ValueError(
            f"--nproc {nproc} does not match the {launched} processes torchrun started; "
            "give the process count once (--nproc, or torchrun --nproc-per-node)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="radlads: %(message)s")
    if getattr(args, "quiet", False):  # transformers' own bars too: loading and writing weights
        transformers.utils.logging.disable_progress_bar()
    try:  # bad input: one line, `radlads COMMAND: error: ...`, exit code 2 (docs/reliability.md)
        if getattr(args, "nproc", 1) != 1:
            check_nproc(args.nproc)
            if "WORLD_SIZE" not in os.environ:
                return under_torchrun(args.nproc, argv)
        if args.command == "convert" or args.command.startswith("step"):
            steps = (0, 1, 2, 3) if args.command == "convert" else (int(args.command[4:]),)
            return commands.convert(config_from_args(args), steps, progress=not args.quiet)
        return getattr(commands, args.command.replace("-", "_"))(args)
    except (ValueError, KeyError, OSError, RuntimeError) as err:  # OSError: a full disk, a permission
        print(f"radlads {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
