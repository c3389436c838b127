"""radlads serve under load: a student against its teacher, through the same HTTP server.

For each model (random weights of --shape: timing does not depend on their values), each prompt
length and each number of concurrent streams, the streams start together; each sends a prompt of
random token ids through /v1/completions (stream=True, greedy, ignore_eos) and reads exactly
--new-tokens tokens, as the official openai client sees them. Per cell: aggregate generated
tokens/s (all tokens over the cell's wall time, prefills included), decoding tokens/s (the tokens
that arrive once every stream has its first one, over that time), time to first token (median and
worst), p50/p99 gap between a stream's tokens, and peak GPU memory (with what was allocated when
the cell began: every model's weights, all loaded in this one process). The student decodes all
streams as one batch of stacked states, the teacher as one batch of left-padded KV caches (see
docs/serving.md), and so does a hybrid student (`--models ...,hybrid`: bench/common.py's
hybrid_layers). A cell that runs out of memory is recorded as "OOM" and the next cells still run. The JSON is
rewritten after every cell, so a run stopped early keeps what it measured.

    python bench/serve.py                                  # GPU: the default grid within --budget-s
    PYTHONPATH=src python bench/serve.py --tiny            # CPU smoke run, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import openai
import torch
from common import (
    GIB,
    Budget,
    add_run_arguments,
    allocated_memory,
    build_student,
    build_teacher,
    default_out_dir,
    free_memory,
    hybrid_layers,
    markdown_table,
    peak_memory,
    pick_device,
    reset_peak_memory,
    write_json,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from radlads.serve import ServeConfig, create_app, running
from radlads.serve.scheduler import Engine

COLUMNS = (
    "model",
    "context",
    "streams",
    "status",
    "tok_s",
    "decode_tok_s",
    "ttft_p50_s",
    "ttft_max_s",
    "itl_p50_ms",
    "itl_p99_ms",
    "peak_gib",
    "resident_gib",
)


PREFIX_COLUMNS = ("prefix_cache", "document_tokens", "ttft_first_s", "ttft_later_p50_s", "skipped_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="teacher shape (bench/common.py SHAPES)")
    p.add_argument("--arch", default="rad-rwkv7")
    p.add_argument("--contexts", default="4096,16384,32768", help="prompt tokens per stream")
    p.add_argument("--streams", default="1,16,64", help="concurrent streams")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--models",
        default="student,teacher",
        help="of student, teacher, hybrid (the student keeping its last two layers softmax); "
        "'' runs only the prefix-cache rows",
    )
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=4096,
        help="shared document of the prefix-cache TTFT rows (student only; 0 skips them)",
    )
    p.add_argument("--prefix-questions", type=int, default=6, help="prompts sharing that document")
    p.add_argument("--budget-s", type=float, default=540, help="cells after this are skipped")
    add_run_arguments(p)
    if p.parse_known_args(argv)[0].tiny:  # CPU-sized defaults; flags given still win
        p.set_defaults(
            shape="tiny",
            device="cpu",
            contexts="64,128",
            streams="1,4",
            new_tokens=8,
            prefix_tokens=1024,
            prefix_questions=4,
        )
    return p.parse_args(argv)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per token id ("w0", "w1", ...): random ids detokenize as they would for a real model."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


async def one_stream(api: openai.AsyncOpenAI, name: str, prompt: list[int], new_tokens: int) -> list[float]:
    """Arrival times of the stream's text chunks (one per token), from the request's start."""
    start = time.perf_counter()
    stream = await api.completions.create(
        model=name,
        prompt=prompt,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter() - start)
    return arrivals


async def run_cell(url: str, name: str, vocab: int, context: int, streams: int, new_tokens: int) -> dict:
    rng = random.Random(context * 1000 + streams)
    prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(streams)]
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=3600) as api:
        start = time.perf_counter()
        arrivals = await asyncio.gather(*(one_stream(api, name, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - start
    tokens = sum(len(a) for a in arrivals)
    gaps = sorted(1e3 * (b - a) for times in arrivals for a, b in zip(times, times[1:]))
    ttft = [times[0] for times in arrivals]
    # Once every stream has its first token, nothing but decoding is left: the batch's steady rate.
    all_in, last = max(ttft), max(times[-1] for times in arrivals)
    decoding = sum(t > all_in for times in arrivals for t in times)
    return {
        "tokens": tokens,
        "complete": tokens == streams * new_tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "decode_tok_s": decoding / (last - all_in) if last > all_in else None,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "itl_p50_ms": gaps[len(gaps) // 2] if gaps else None,
        "itl_p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None,
    }


def prefix_rows(model, tokenizer, args) -> list[dict]:
    """Time to first token of prompts that share a document (each: the document, then its own
    100-token question), one after another, with the prefix-state cache off and on. The first prompt
    runs in full either way and the second finds where it leaves the first; from the third on, a
    cached state stands in for the document's prefill."""
    vocab = model.config.vocab_size
    rng = random.Random(0)
    document = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
    prompts = [document + [rng.randrange(vocab) for _ in range(100)] for _ in range(args.prefix_questions)]
    rows = []
    for cache_bytes in (0, 1 << 30):
        config = ServeConfig(max_prompt_tokens=len(prompts[0]), prefix_cache_bytes=cache_bytes)
        engine = Engine(model, tokenizer, config)
        with running(create_app(engine, "student")) as url:
            asyncio.run(run_cell(url, "student", vocab, 64, 1, 2))  # warm-up

            async def ttfts():
                async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as api:
                    return [(await one_stream(api, "student", p, 1))[0] for p in prompts]

            times = asyncio.run(ttfts())
        rows.append(
            {
                "prefix_cache": bool(cache_bytes),
                "document_tokens": len(document),
                "prompt_tokens": len(prompts[0]),
                "ttft_first_s": times[0],
                "ttft_later_p50_s": statistics.median(times[2:]),
                "skipped_tokens": engine.metrics.prefix_tokens_skipped._value.get(),
            }
        )
        print(rows[-1], flush=True)
    return rows


def measure(url, name, vocab, context, streams, args, device, row: dict[str, Any]) -> None:
    reset_peak_memory(device)
    resident = allocated_memory(device)  # every model's weights and graphs, before the cell
    row["resident_gib"] = resident / GIB if resident is not None else None
    try:
        row.update(asyncio.run(run_cell(url, name, vocab, context, streams, args.new_tokens)))
        row["status"] = "ok" if row["complete"] else "incomplete"
    except openai.APIError as error:  # the server's error event: out of memory, say
        row["status"] = "OOM" if "OutOfMemory" in str(error) else f"error: {str(error)[:120]}"
    peak = peak_memory(device)
    row["peak_gib"] = peak / GIB if peak is not None else None
    free_memory(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = [int(x) for x in args.contexts.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    budget = Budget(args.budget_s)
    teacher = build_teacher(args.shape, device, dtype)
    built = {"teacher": teacher, "student": build_student(teacher, args.arch)}
    if "hybrid" in args.models.split(","):
        layers = hybrid_layers(teacher.config.num_hidden_layers)
        built["hybrid"] = build_student(teacher, args.arch, softmax_layers=layers)
    vocab = teacher.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    rows: list[dict] = []
    prefix: list[dict] = []
    settings = {k: v for k, v in vars(args).items() if k != "out"}

    def payload() -> dict:
        return {"settings": settings, "results": rows, "prefix_cache": prefix}

    def save() -> Path:
        return write_json(args.out or default_out_dir(), "serve", payload())

    for name in [m for m in args.models.split(",") if m]:
        config = ServeConfig(
            max_batch=max(streams),
            max_prompt_tokens=max(contexts),
            max_new_tokens=args.new_tokens,
            prefix_cache_bytes=0,  # every prompt is new: nothing to reuse
        )
        engine = Engine(built[name], tokenizer, config)
        with running(create_app(engine, name)) as url:
            # Warm-up: compiling, CUDA-graph capture of each batch size the cells reach, allocator growth.
            asyncio.run(run_cell(url, name, vocab, 64, max(streams), args.new_tokens))
            for context in contexts:
                for n in streams:
                    row = {"model": name, "context": context, "streams": n, "new_tokens": args.new_tokens}
                    if budget.left() <= 0:
                        row["status"] = "skipped (budget)"
                    else:
                        measure(url, name, vocab, context, n, args, device, row)
                    rows.append(row)
                    save()
                    print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    if args.prefix_tokens:
        prefix += prefix_rows(built["student"], tokenizer, args)
    path = save()
    print(markdown_table(rows, COLUMNS))
    print(markdown_table(prefix, PREFIX_COLUMNS))
    print(f"written to {path}")
    return payload()


if __name__ == "__main__":
    main()
