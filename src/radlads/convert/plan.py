"""Resource plan of a conversion, from the teacher's config.json alone (no weights, no GPU).

Parameter counts are exact: teacher and student are built on the meta device (no memory) and
their parameters summed. Memory is an *estimate* per GPU for each protocol step, under these
assumptions (all sizes in bytes, GB = 1e9 bytes):

Model states (sharded: divided by the number of GPUs with FSDP2 / ZeRO-3):
- the frozen teacher is held in bf16 (2 bytes/param) in steps 1 and 2;
- trainable parameters keep an fp32 master copy (4), an fp32 gradient (4) and AdamW's two
  moments: fp32 (8; 16 bytes per trainable parameter in all), bf16 (4; 12 in all) or 8-bit with
  a fp32 scale per 256 values (~2; ~10 in all), by the optimizer (radlads.train.optimizers);
- step 1 trains only the time mixers; the rest of the student (embeddings, MLPs, norms, head,
  kept softmax layers) is frozen and held in bf16 (2 bytes/param);
- steps 2 and 3 train the whole student with the LM head untied from the embedding (SPEC §2),
  so the student has `vocab × hidden` more parameters than at step 0 when the teacher ties them.

Activations (not sharded: every GPU runs its own micro-batch of `batch_size × seq_len` tokens):
- bf16 autocast (2 bytes/element) except the decay (log w) and the chunked-kernel states, fp32;
- a time mixer saves ~10 bf16 tensors per token for backward: its hidden-sized input x and 9 of
  its width, heads × head_dim (r, k, v after GQA expansion, κ, replacement k, a, value-residual
  mix, gate, y), plus log w (fp32) and the chunk kernel's per-64-token states (head_dim/64 fp32
  tensors of its width per token); the width is the hidden size except where head_dim is set
  apart from it (Qwen3-0.6B, 4B and 32B: 1.6-2x);
- a teacher-family MLP saves its input and four intermediate-sized tensors (gate, up, act, product);
  norms and residual adds ~4 hidden-sized bf16 tensors;
- step 1 keeps, for every layer, the captured teacher attention input and output (2 bf16
  hidden-sized tensors per token) and the mixer activations of every converted layer (the losses
  of all layers are summed, so the graphs of all mixers live until backward);
- with activation checkpointing only each layer's input (1 bf16 hidden-sized tensor per token) is
  kept, plus one layer's full activations while it is recomputed;
- RAD-RWKV7 with `keep_kernel_intermediates` (and the layer recomputed under checkpointing, which
  training always runs that way) also holds fla's forward intermediates: `kept_kernel_bytes`
  per token and head (2,176 at head size 64; 1,344 for its TileLang kernels), in every converted
  layer until its backward;
- the chunked KL / CE materialises `chunk × vocab` logits, one chunk at a time: for KL the
  student's and the teacher's bf16 logits (on CUDA radlads' Triton kernel writes the gradient over
  the student's: 2 bf16 copies; measured on an H100, step 2 at 48 × 512 tokens on the
  Qwen2.5-0.5B shape peaked at 52.8 GB, this estimate says 58.3), for CE the bf16 logits and
  their bf16 gradient, as the compiled terms keep them on CUDA (convert's default; uncompiled
  they hold ~3 fp32 copies, 5-7 GB more at the 7B's step 3). Measured on an H200, step 3 of the
  Qwen2.5-7B shape at 1 × 16384 tokens with activation checkpointing peaked at 102.5 GB; this
  estimate says 109.2 (114.1 when it counted fp32 copies). Plus the final hidden states of
  student (and teacher) for the whole micro-batch;
- the no-grad teacher forward of step 2 needs one layer's transient activations.

Decoding memory per sequence (`DecodeMemory`) is exact, not estimated: a student holds a fp32
[heads, head_dim, head_dim] state per time mixer and the keys and values of its softmax layers,
the teacher the keys and values of every layer, in the model's dtype (bf16: 2 bytes).

A GPU is considered to hold `usable_fraction` (0.9) of its memory: the rest covers the CUDA
context, allocator fragmentation, NCCL and FSDP all-gather buffers. The recommended GPU count is
the smallest of 1/2/4/8/16 at which `states / N + activations` fits; None when 16 does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..train.optimizers import STATE_BYTES
from .presets import step3_seq_len as default_step3_seq_len

GB = 1e9
GPU_COUNTS = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (4096, 32768, 131072)
BF16, FP16, FP32 = 2, 2, 4
MIXER_BF16_TENSORS = 10
MLP_BF16_INTERMEDIATES = 4
NORM_RESIDUAL_TENSORS = 4
KL_BYTES = 2 * BF16  # per chunk element: student logits (then their gradient), teacher logits
CE_BYTES = 2 * BF16  # per chunk element: logits, then their gradient
FLA_CHUNK = 64  # RAD-RWKV7's fla chunk size (with its decay floor)
TILELANG_CHUNK = 32  # fla's TileLang kernels' chunk size on an H100 (its verifier turns down 64)


def kept_kernel_bytes(head_dim: int, tilelang: bool = False) -> float:
    """Bytes per token and head that fla's chunked RWKV-7 forward keeps for its backward when told
    not to recompute them (fla 0.6.0). Its Triton kernels (kernels.fla_ops' fake outputs): gi, ge
    (fp32), three chunk-wide products (two bf16, one fp32), five gated bf16 copies, the chunk
    states (bf16, one per 64 tokens), the new values (bf16) and the inverted chunk matrix (fp32).
    Its TileLang kernels (`tilelang`; the fake outputs of fla's `chunk_dplr_delta_rule_fwd_ctx`
    op): the chunk states (bf16, one per 32 tokens), the new values and five gated copies (bf16),
    and four chunk-wide matrices (fp32, fp16, two bf16)."""
    n = head_dim
    if tilelang:
        c = TILELANG_CHUNK
        return n * n * BF16 / c + 6 * n * BF16 + c * (FP32 + FP16 + 2 * BF16)
    c = FLA_CHUNK
    return 2 * n * FP32 + (2 * BF16 + FP32) * c + 5 * n * BF16 + n * n * BF16 / c + n * BF16 + c * FP32


@dataclass
class StepMemory:
    """Memory of one step: sharded model states (total over GPUs) plus per-GPU activations."""

    name: str
    states_bytes: float  # teacher + student params, grads, optimizer: divided by N under FSDP2
    activation_bytes: float  # per GPU, not divided

    def per_gpu_bytes(self, gpus: int) -> float:
        return self.states_bytes / gpus + self.activation_bytes

    def gpus_needed(self, gpu_memory_bytes: float) -> int | None:
        return next((n for n in GPU_COUNTS if self.per_gpu_bytes(n) <= gpu_memory_bytes), None)


@dataclass
class DecodeMemory:
    """What one sequence holds while it decodes: the student's fixed-size recurrent state plus the
    keys and values of its softmax layers (a fixed number of them where windowed), against the
    teacher's keys and values in every layer."""

    state_bytes: int
    student_kv_bytes_per_token: int
    teacher_kv_bytes_per_token: int
    trained_context: int  # the teacher's: the longest context the table shows
    window_kv_bytes: int = 0  # a windowed hybrid's keys, values, columns and ranks: a fixed size
    window_slots: int | None = None

    def student(self, tokens: int) -> int:
        return self.state_bytes + self.window_kv_bytes + tokens * self.student_kv_bytes_per_token

    def teacher(self, tokens: int) -> int:
        return tokens * self.teacher_kv_bytes_per_token


def decode_memory(student_config, kv_bytes: int = BF16) -> DecodeMemory:
    """Decoding memory per sequence of a student (by its config) and of its teacher."""
    cfg = student_config
    softmax = sum(cfg.is_softmax_layer(i) for i in range(cfg.num_hidden_layers))
    state = cfg.num_attention_heads * cfg.head_dim**2 * FP32
    kv_per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    slots = cfg.softmax_kv_slots
    # A windowed layer also keeps each key's column and rank (int64), to prune by.
    window = softmax * slots * (kv_per_layer + 2 * 8) if slots else 0
    return DecodeMemory(
        state_bytes=(cfg.num_hidden_layers - softmax) * state,
        student_kv_bytes_per_token=0 if slots else softmax * kv_per_layer,
        teacher_kv_bytes_per_token=cfg.num_hidden_layers * kv_per_layer,
        trained_context=cfg.max_position_embeddings,
        window_kv_bytes=window,
        window_slots=slots,
    )


@dataclass
class ConversionPlan:
    teacher: str
    arch: str
    teacher_params: int
    student_params: int  # as built at step 0 (head tied if the teacher ties it)
    student_params_untied: int  # steps 2-3: the LM head has its own weight
    mixer_params: int  # trained in step 1
    seq_len: int
    step3_seq_len: int
    batch_size: int
    step3_batch_size: int
    gpu_memory_gb: float
    decode: DecodeMemory
    usable_fraction: float = 0.9
    optimizer: str = "adamw"
    steps: list[StepMemory] = field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GB * self.usable_fraction

    def gpus_needed(self) -> dict[str, int | None]:
        return {s.name: s.gpus_needed(self.usable_bytes) for s in self.steps}

    def recommended_gpus(self) -> int | None:
        """GPUs for the whole run: the most any step needs, taking checkpointing where it helps."""
        need = self.gpus_needed()
        per_step = []
        for k in ("step 1", "step 2", "step 3"):
            options = [n for name, n in need.items() if name.startswith(k) and n is not None]
            if not options:
                return None
            per_step.append(min(options))
        return max(per_step)

    def to_markdown(self) -> str:
        def gb(x: float) -> str:
            return f"{x / GB:.1f}"

        rec = self.recommended_gpus()
        lines = [
            f"Plan for {self.teacher} -> {self.arch}",
            "",
            f"- teacher parameters: {self.teacher_params:,}",
            f"- student parameters: {self.student_params:,} "
            f"({self.student_params_untied:,} with the LM head untied, steps 2-3)",
            f"- time-mixer parameters trained in step 1: {self.mixer_params:,}",
            f"- micro-batch: {self.batch_size} x {self.seq_len} tokens (steps 1-2), "
            f"{self.step3_batch_size} x {self.step3_seq_len} (step 3)",
            f"- optimizer: {self.optimizer}, {STATE_BYTES[self.optimizer]:.4g} bytes per trained "
            "parameter (master weight, gradient, moments)",
            f"- GPU: {self.gpu_memory_gb:g} GB, {self.usable_fraction:.0%} usable; "
            "teacher and student+optimizer sharded with FSDP2",
            "",
            "| step | states GB (all GPUs) | activations GB/GPU | "
            + " | ".join(f"GB/GPU @{n}" for n in GPU_COUNTS)
            + f" | GPUs ({self.gpu_memory_gb:g} GB) |",
            "|---|---:|---:|" + "---:|" * len(GPU_COUNTS) + "---:|",
        ]
        for s in self.steps:
            n = s.gpus_needed(self.usable_bytes)
            lines.append(
                f"| {s.name} | {gb(s.states_bytes)} | {gb(s.activation_bytes)} | "
                + " | ".join(gb(s.per_gpu_bytes(g)) for g in GPU_COUNTS)
                + f" | {n if n is not None else '>16'} |"
            )
        lines += [
            "",
            f"Recommended: {rec if rec is not None else 'more than 16'} GPU(s) of "
            f"{self.gpu_memory_gb:g} GB (with activation checkpointing where it is needed).",
        ]
        return "\n".join(lines) + "\n"

    def decode_table(self) -> list[str]:
        d = self.decode
        kv = (
            f" + {d.student_kv_bytes_per_token:,} bytes/token of KV cache"
            if d.student_kv_bytes_per_token
            else ""
        )
        if d.window_slots:
            kv = f" + {d.window_kv_bytes / 1e6:.1f} MB of KV cache for its window and sinks"
            kv += f" ({d.window_slots:,} tokens)"
        lines = [
            f"Decoding memory per sequence, up to the teacher's trained context, bf16 KV caches (student: "
            f"{d.state_bytes / 1e6:.1f} MB of recurrent state{kv}; teacher: {d.teacher_kv_bytes_per_token:,} "
            "bytes/token):",
            "",
            "| context (tokens) | student | teacher |",
            "|---|---:|---:|",
        ]
        contexts = sorted({t for t in DECODE_CONTEXTS if t < d.trained_context} | {d.trained_context})
        for tokens in contexts:
            lines.append(
                f"| {tokens:,} | {d.student(tokens) / 1e6:,.1f} MB | {d.teacher(tokens) / 1e6:,.1f} MB |"
            )
        return lines


def load_config(teacher: str | Path) -> PretrainedConfig:
    """A folder holding config.json, or the path of a config JSON file (any name)."""
    path = Path(teacher)
    if not path.is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{teacher}: no config.json (pass a model folder or a config.json path)")
    return AutoConfig.from_pretrained(path)


def count_params(module: torch.nn.Module) -> int:
    """Unique parameters (a tied head counts once), as sum(p.numel() for p in parameters())."""
    return sum(p.numel() for p in module.parameters())


def build_meta_models(config: PretrainedConfig, arch: str = "rad-rwkv7", **student_options):
    """Teacher and student on the meta device: shapes only, no memory, no init cost."""
    from ..models import RadladsForCausalLM
    from .transfer import student_config

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        student = RadladsForCausalLM(student_config(teacher, arch, **student_options))
    return teacher, student


def _layer_tokens_bytes(cfg: PretrainedConfig, head_dim: int) -> tuple[float, float, float]:
    """Per-token activation bytes of (one time mixer, one MLP + norms, one layer input)."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    d = cfg.num_attention_heads * head_dim  # the mixer's width: not the hidden size in Qwen3's 0.6B, 4B, 32B
    mixer = (c + (MIXER_BF16_TENSORS - 1) * d) * BF16 + (1 + head_dim / 64) * d * FP32
    mlp = (c + MLP_BF16_INTERMEDIATES * i) * BF16 + NORM_RESIDUAL_TENSORS * c * BF16
    return mixer, mlp, c * BF16


def plan(
    teacher: str | Path,
    arch: str = "rad-rwkv7",
    gpu_memory_gb: float = 80.0,
    seq_len: int = 512,
    step3_seq_len: int | None = None,
    batch_size: int = 8,
    step3_batch_size: int = 1,
    chunk_tokens: int = 4096,
    softmax_layers: tuple[int, ...] = (),
    softmax_window: int | None = None,
    softmax_sinks: int | None = None,
    usable_fraction: float = 0.9,
    keep_kernel_intermediates: bool = False,
    tilelang: bool = False,
    optimizer: str = "adamw",
) -> ConversionPlan:
    """Parameter counts (exact) and per-step memory estimates (see the module docstring).
    `keep_kernel_intermediates`: as `radlads convert --keep-kernel-intermediates` (RAD-RWKV7:
    every converted layer keeps fla's intermediates until its backward; under activation
    checkpointing the recomputed layer keeps them anyway, as training does). `tilelang`: those
    of fla's TileLang kernels, which training runs where they are installed and fla takes them.
    `optimizer`: one of radlads.train.optimizers.OPTIMIZERS, for the bytes of each trained parameter."""
    trained_bytes = STATE_BYTES[optimizer]
    cfg = load_config(teacher)
    if step3_seq_len is None:  # as convert runs step 3
        step3_seq_len = default_step3_seq_len(getattr(cfg, "max_position_embeddings", None))
    window = {"softmax_window": softmax_window, "softmax_sinks": softmax_sinks}
    t_model, s_model = build_meta_models(
        cfg, arch, softmax_layers=list(softmax_layers), **{k: v for k, v in window.items() if v is not None}
    )
    scfg = s_model.config
    teacher_params = count_params(t_model)
    student_params = count_params(s_model)
    tied = s_model.lm_head.weight is s_model.model.embed_tokens.weight
    student_untied = student_params + (s_model.lm_head.weight.numel() if tied else 0)
    converted = [i for i in range(scfg.num_hidden_layers) if not scfg.is_softmax_layer(i)]
    mixer_params = sum(count_params(s_model.model.layers[i].self_attn) for i in converted)

    head_dim = scfg.head_dim
    n_layers, c, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    mixer_tok, mlp_tok, input_tok = _layer_tokens_bytes(cfg, head_dim)
    layer_tok = mixer_tok + mlp_tok
    # fla's kept RWKV-7 intermediates (RAD-RWKV6's GLA kernels always recompute): in every converted
    # layer with the switch; under activation checkpointing in the one layer recomputed, either way.
    kept_tok = cfg.num_attention_heads * kept_kernel_bytes(head_dim, tilelang) if arch == "rad-rwkv7" else 0
    all_kept_tok = len(converted) * kept_tok if keep_kernel_intermediates else 0
    recomputed_tok = layer_tok + kept_tok

    def logits(tokens: int, bytes_per_element: int) -> float:
        return min(chunk_tokens, tokens) * vocab * bytes_per_element

    teacher_bytes = teacher_params * BF16
    steps: list[StepMemory] = []

    # Step 1: frozen teacher + frozen student remainder (bf16) + trainable mixers.
    tok1 = batch_size * seq_len
    states1 = teacher_bytes + (student_params - mixer_params) * BF16 + mixer_params * trained_bytes
    act1 = tok1 * (n_layers * 2 * c * BF16 + len(converted) * mixer_tok + all_kept_tok)
    steps.append(StepMemory("step 1 (alignment)", states1, act1))

    # Step 2: frozen teacher + whole untied student trained.
    tok2 = batch_size * seq_len
    states2 = teacher_bytes + student_untied * trained_bytes
    tail2 = 2 * tok2 * c * BF16 + logits(tok2, KL_BYTES) + tok2 * mlp_tok  # finals, KL, teacher layer
    steps.append(StepMemory("step 2 (KL)", states2, tok2 * (n_layers * layer_tok + all_kept_tok) + tail2))
    steps.append(
        StepMemory("step 2 (KL, act. ckpt)", states2, tok2 * (n_layers * input_tok + recomputed_tok) + tail2)
    )

    # Step 3: student alone at long context.
    tok3 = step3_batch_size * step3_seq_len
    states3 = student_untied * trained_bytes
    tail3 = tok3 * c * BF16 + logits(tok3, CE_BYTES)
    steps.append(StepMemory("step 3 (CE)", states3, tok3 * (n_layers * layer_tok + all_kept_tok) + tail3))
    steps.append(
        StepMemory("step 3 (CE, act. ckpt)", states3, tok3 * (n_layers * input_tok + recomputed_tok) + tail3)
    )

    return ConversionPlan(
        teacher=str(teacher),
        arch=arch,
        teacher_params=teacher_params,
        student_params=student_params,
        student_params_untied=student_untied,
        mixer_params=mixer_params,
        seq_len=seq_len,
        step3_seq_len=step3_seq_len,
        batch_size=batch_size,
        step3_batch_size=step3_batch_size,
        gpu_memory_gb=gpu_memory_gb,
        usable_fraction=usable_fraction,
        optimizer=optimizer,
        steps=steps,
        decode=decode_memory(scfg),
    )
