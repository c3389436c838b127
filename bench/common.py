"""Shared pieces of the benchmarks: teacher shapes, model building, timing, floors, output.

Running `python bench/X.py` puts bench/ first on sys.path, so no file here may share a name with
an importable package (transformers probes `import kernels`: a bench/kernels.py breaks it).

Every benchmark times the path users run: the HF model's own forward with its own cache (the
student's RadladsCache, the teacher's DynamicCache), never a re-implementation.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
_SRC = ROOT / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_SRC))

# Measured on H100 SXM in this project (treat as leads, not truths): dense bf16 matmul and HBM.
PEAK_BF16_FLOPS = 790e12
PEAK_HBM_BYTES_PER_S = 3.0e12
GIB = 1024**3

SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rms_norm_eps",
)


def plan_shape(name: str) -> dict[str, Any]:
    """A teacher shape from the published config.json kept in docs/plan/NAME.json."""
    config = json.loads((ROOT / "docs" / "plan" / f"{name}.json").read_text())
    return dict(family=config["model_type"], **{k: config[k] for k in SHAPE_KEYS})


# Teacher shapes (public configs). Random weights: timing does not depend on their values.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": plan_shape("qwen2.5-7b"),
    "qwen2.5-0.5b": dict(
        family="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # --tiny: runs end to end on 2 CPU cores in seconds.
    "tiny": dict(
        family="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
}


# --------------------------------------------------------------------------- environment


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: where it runs, where its JSON goes, a CPU smoke run."""
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON directory (default $OUT or bench/results)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_out_dir() -> Path:
    return Path(os.environ.get("OUT") or "bench/results")


def environment() -> dict[str, Any]:
    """What produced the numbers, so a JSON file can be read without the run's log."""
    info: dict[str, Any] = {
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("transformers", "triton", "fla"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # missing or without __version__: record the fact, do not fail the run
            info[name] = None
    # Where installed, fla runs its TileLang kernels for the calls its verifier takes (radlads'
    # training recurrence, the benchmarks' chunk_rwkv7 rows at 32-token chunks): read, not imported.
    try:
        info["tilelang"] = importlib.metadata.version("tilelang")
    except importlib.metadata.PackageNotFoundError:
        info["tilelang"] = None
    if torch.cuda.is_available():
        info["gpu"] = gpu_name()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        info["git_commit"] = None
    # A copied working tree (on a remote GPU host) can carry an older .git than the code that ran: this
    # names the code itself. `python bench/common.py` prints it for the tree at hand.
    info["source_sha256"] = source_digest()
    return info


@functools.cache  # the code as the run started; write_json asks after every cell
def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"


def source_digest() -> str:
    """sha256 over the package's and the benchmarks' Python files (paths and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("src/radlads/**/*.py"), *ROOT.glob("bench/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- models


def teacher_config(shape: str, max_positions: int = 131072):
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    # max_position_embeddings only has to cover the longest benchmarked context.
    return config_cls(**spec, max_position_embeddings=max_positions)


def build_teacher(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight teacher of the given shape, built directly on the device, SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            teacher_config(shape), dtype=dtype, attn_implementation="sdpa"
        )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def write_random_inputs(
    work: Path, shape: str, train_tokens: int, heldout_tokens: int, weights: bool = True
) -> None:
    """A teacher folder of the shape (with random bf16 weights, or with `weights=False` its
    config.json alone, for `radlads convert --random-teacher-weights`), a word-level tokenizer of
    its vocabulary, and a prepared shard folder of uniformly random token ids: throughput depends
    on none of their values."""
    import numpy as np
    from transformers import AutoTokenizer

    from radlads.data.index import PrepareSettings, ShardIndex, SplitInfo
    from radlads.data.shards import token_dtype
    from radlads.data.tokenizer import tokenizer_hash

    sys.path.insert(0, str(ROOT / "tests"))  # the offline word-level tokenizer of the test fixtures
    from tokenizer_fixture import make_wordlevel_tokenizer

    vocab = SHAPES[shape]["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(make_wordlevel_tokenizer(work, vocab))
    if weights:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher = build_teacher(shape, device, torch.bfloat16)
        teacher.config.eos_token_id = tokenizer.eos_token_id
        teacher.save_pretrained(work / "teacher")
    else:
        config = teacher_config(shape)
        config.eos_token_id = tokenizer.eos_token_id
        config.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    # Loaded as the pipeline loads it: next to config.json, AutoTokenizer picks the family's class.
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")

    data, dtype = work / "data", token_dtype(vocab)
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, tokens in (("train", train_tokens), ("heldout", heldout_tokens)):
        rng.integers(0, vocab, tokens, dtype=np.int64).astype(dtype).tofile(data / f"{split}.bin")
        splits[split] = SplitInfo(file=f"{split}.bin", documents=1, tokens=tokens)
    ShardIndex(
        dtype=dtype.name,
        tokenizer_name=f"random word-level ({vocab})",
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=vocab,
        eos_id=tokenizer.eos_token_id,
        settings=PrepareSettings(
            held_out_fraction=0.0, held_out_tokens=heldout_tokens, append_eos=False, seed=0
        ),
        splits=splits,
        sources=[],
    ).save(data)
    what = "random, bf16" if weights else "config.json only"
    print(f"teacher ({shape}, {what}) in {work / 'teacher'}; {train_tokens} random train tokens in {data}")


def hybrid_layers(layers: int) -> list[int]:
    """A benchmark hybrid's softmax layers: the last two, as many as `--softmax-layers auto:2` keeps
    (which two does not change the timing); the last one on a two-layer shape."""
    return list(range(-min(2, layers - 1), 0))


def build_student(teacher: nn.Module, arch: str, **options) -> nn.Module:
    """The step-0 student (radlads.convert.transfer), on the teacher's device and dtype."""
    from radlads.convert.transfer import transfer

    device = next(teacher.parameters()).device
    with torch.device(device):  # build on the GPU directly: much faster than a CPU init + copy
        student = transfer(teacher, arch=arch, **options)
    return student.eval().requires_grad_(False)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in unique_parameters(model))


# --------------------------------------------------------------------------- floors


@dataclass
class ModelCost:
    """What a forward costs at minimum, from the model's own modules and config."""

    kind: str  # "softmax", "rwkv7" or "gla"
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    matmul_params: int  # weights of every nn.Linear, the LM head included
    lm_head_params: int
    decode_weight_bytes: int  # bytes one decode step must read: all weights but the embedding gather
    act_bytes: int  # bytes per element of activations / KV cache
    piece_tokens: int | None = None  # a prefill runs at most this many tokens at once (students)
    softmax_layers: int = 0  # layers with softmax attention: all of a teacher's, a hybrid's kept ones
    kv_slots: int | None = None  # keys a windowed hybrid's softmax layer keeps at most (window + sinks)

    @classmethod
    def of(cls, model: nn.Module) -> ModelCost:
        config = model.config
        teacher_cfg = config.teacher() if hasattr(config, "teacher") else config
        arch = getattr(config, "arch", None)
        kind = {"rad-rwkv7": "rwkv7", "rad-rwkv6": "gla"}.get(arch, "softmax")
        heads = teacher_cfg.num_attention_heads
        head_dim = getattr(teacher_cfg, "head_dim", None) or teacher_cfg.hidden_size // heads
        linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
        lm_head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        layers = teacher_cfg.num_hidden_layers
        softmax = layers if kind == "softmax" else len(config.softmax_layers or ())
        slots = getattr(config, "softmax_kv_slots", None)
        read = weight_bytes(model)
        if embed is not lm_head:  # an untied embedding is only gathered, a row per token
            read -= embed.numel() * embed.element_size()
        return cls(
            kind=kind,
            hidden=teacher_cfg.hidden_size,
            intermediate=teacher_cfg.intermediate_size,
            vocab=teacher_cfg.vocab_size,
            layers=layers,
            heads=heads,
            kv_heads=teacher_cfg.num_key_value_heads or heads,
            head_dim=head_dim,
            matmul_params=sum(w.numel() for w in linears.values()),
            lm_head_params=lm_head.numel(),
            decode_weight_bytes=read,
            act_bytes=lm_head.element_size(),
            # a hybrid prefills in one pass unless windowed (RadladsModel.forward)
            piece_tokens=None if softmax and not slots else getattr(config, "prefill_chunk_tokens", None),
            softmax_layers=softmax,
            kv_slots=slots,
        )

    @property
    def linear_layers(self) -> int:
        return self.layers - self.softmax_layers

    def kv_bytes_per_token(self) -> int:
        """Softmax layers' KV cache per kept token per sequence (a windowed layer also keeps each
        key's int64 column and rank)."""
        per_layer = 2 * self.kv_heads * self.head_dim * self.act_bytes + (16 if self.kv_slots else 0)
        return self.softmax_layers * per_layer

    def kept(self, context: int) -> int:
        """Keys a softmax layer holds, and a decoding step reads, after `context` tokens (a windowed
        layer's slots, full or not, from the first token on)."""
        return context if self.kv_slots is None else self.kv_slots

    def state_bytes(self) -> int:
        """Linear-attention layers' recurrent fp32 state per sequence."""
        return self.linear_layers * self.heads * self.head_dim**2 * 4

    def recurrence_flops_per_token(self) -> int:
        """State update + readout per token, all heads and layers (recurrent form: a lower bound).

        gla: decay (KV) + outer product (2KV) + readout (2KV); rwkv7 adds a^T S and b (a^T S) (4KV).
        """
        per_head = {"gla": 5, "rwkv7": 9}.get(self.kind, 0) * self.head_dim**2
        return self.linear_layers * self.heads * per_head


def floor_ms(flops: float, bytes_moved: float) -> float:
    """Roofline floor: the slower of compute at peak matmul rate and traffic at peak HBM bandwidth."""
    return 1e3 * max(flops / PEAK_BF16_FLOPS, bytes_moved / PEAK_HBM_BYTES_PER_S)


def decode_floor(cost: ModelCost, batch: int, context: int) -> dict[str, float]:
    """One decode step of `batch` sequences at `context` past tokens: weights read once per step,
    plus the teacher's whole KV cache read (ideal; HF's DynamicCache also rewrites it with
    torch.cat every step) or the student's state read and written."""
    bytes_moved = cost.decode_weight_bytes + batch * (
        cost.kept(context) * cost.kv_bytes_per_token() + 2 * cost.state_bytes()
    )
    attn = 4 * cost.kept(context) * cost.heads * cost.head_dim * cost.softmax_layers  # q k^T and p v
    flops = batch * (2 * cost.matmul_params + attn + cost.recurrence_flops_per_token())
    return {"bytes": bytes_moved, "flops": flops, "ms": floor_ms(flops, bytes_moved)}


def prefill_floor(cost: ModelCost, batch: int, context: int) -> dict[str, float]:
    """A prefill of `context` tokens with logits for the last one only (logits_to_keep=1)."""
    tokens = batch * context
    body = cost.matmul_params - cost.lm_head_params
    # causal: half of 4 T^2 d, or of 4 T (window + sinks) d for a windowed layer
    attended = context if cost.kv_slots is None else min(context, cost.kv_slots)
    attn = 2 * context * attended * cost.heads * cost.head_dim * cost.softmax_layers
    flops = 2 * tokens * body + 2 * batch * cost.lm_head_params + batch * attn
    flops += tokens * cost.recurrence_flops_per_token()
    kv = batch * cost.kept(context) * cost.kv_bytes_per_token()
    bytes_moved = cost.decode_weight_bytes + kv + batch * cost.state_bytes()
    return {"bytes": bytes_moved, "flops": flops, "ms": floor_ms(flops, bytes_moved)}


# --------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Marks on the device's timeline (CUDA events; host clock elsewhere).

    The device is synchronised before the first mark, so an event recorded while the GPU idles
    starts the clock at the moment the host enqueues it: launch overhead is included, as a user
    sees it.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[Any] = []

    def start(self) -> Stopwatch:
        sync(self.device)
        self.marks = []
        return self.mark()

    def mark(self) -> Stopwatch:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return self

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def time_ms(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 5, max_total_s: float = 2.0
) -> list[float]:
    """Run fn `warmup` times, then time it up to `repeats` times (at least once, stopping early
    once `max_total_s` of timed runs have passed). Returns every timed run in ms."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(repeats, 1):
        watch = Stopwatch(device).start()
        fn()
        times.append(watch.mark().intervals_ms()[0])
        if sum(times) > 1e3 * max_total_s:
            break
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_memory(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Drop cached blocks so one cell's leftovers (or a failed one's) do not distort the next."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(run: Callable[[], Any], row: dict[str, Any], device: torch.device) -> None:
    """run(), turning an OOM or a crash into row["status"] so that the remaining cells still run."""
    try:
        run()
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # one failing cell must not lose the whole (single, timed) GPU run
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
    free_memory(device)  # after the except block: the traceback no longer pins the tensors


def device_capacity(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


# --------------------------------------------------------------------------- output


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {"environment": environment(), **payload}
    path.write_text(json.dumps(record, indent=1, default=_jsonable))
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 0.01:
            return f"{x:.3f}"
        return f"{x:.2e}"
    return str(x)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


class Budget:
    """Wall-clock allowance of a script, so it prints what it has before its caller's limit."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# Kernel families by name, first match wins: where an update's GPU time goes.
KERNEL_FAMILIES = (
    # Inductor names its fused kernels after the ops inside (..._to_copy_..., ..._cat_...): first.
    ("compiled (fused)", re.compile(r"^triton_")),
    ("vocab loss", re.compile(r"^_kl_rows$")),  # radlads.kernels.kl_div
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|cublas", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("recurrence", re.compile(r"chunk|fused_recurrent|dplr|wy_|wu_|gla|rwkv|delta", re.I)),
    ("copy/fill", re.compile(r"copy|memcpy|memset|fill|cat|index|scatter|gather", re.I)),
    ("reduction", re.compile(r"reduce|norm|softmax|sum|max", re.I)),
    ("elementwise", re.compile(r"elementwise", re.I)),
)


def kernel_family(name: str) -> str:
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(name)), "other")


if __name__ == "__main__":
    print(source_digest())
