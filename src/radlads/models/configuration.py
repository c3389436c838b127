"""RadladsConfig: the teacher's config plus the student's choices (architecture, ranks, init)."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

ARCHS = ("rad-rwkv7", "rad-rwkv6")
DECAY_INITS = ("across-heads", "per-head")

# Fields copied from the teacher to the top level so that generic HF code (generate, pipelines,
# lm-eval) finds them where it looks for them.
_MIRRORED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


def round_up_32(x: float) -> int:
    return max(32, int(math.ceil(x / 32) * 32))


def gate_lora_rank(arch: str, hidden_size: int) -> int:
    """The SPEC's gate LoRA rank, round_up_32(0.6 C^0.8); RAD-RWKV6's is capped at 128 (its rank
    at the 7B scale)."""
    rank = round_up_32(0.6 * hidden_size**0.8)
    return min(128, rank) if arch == "rad-rwkv6" else rank


def default_ranks(arch: str, hidden_size: int) -> dict[str, int | None]:
    """LoRA ranks from the SPEC: round_up_32(C^0.5 * m); the RWKV-6 gate is low rank (<= 128)."""
    root = hidden_size**0.5
    return {
        "decay_rank": round_up_32(root * 1.8),
        "iclr_rank": round_up_32(root * 1.8),
        "value_rank": round_up_32(root * 1.3),
        # RAD-RWKV7's gate is full rank unless asked for (gate_rank: an int or "auto").
        "gate_rank": gate_lora_rank(arch, hidden_size) if arch == "rad-rwkv6" else None,
    }


class RadladsConfig(PretrainedConfig):
    """Config of a RADLADS student.

    `teacher_config` is the teacher's full config dict: embeddings, MLPs, norms and RoPE are the
    teacher family's own modules built from it. Every other field has a default from the SPEC.
    """

    model_type = "radlads"

    def __init__(
        self,
        arch: str = "rad-rwkv7",
        teacher_config: dict[str, Any] | None = None,
        softmax_layers: list[int] | tuple[int, ...] = (),
        softmax_window: int | None = None,
        softmax_sinks: int = 4,
        decay_rank: int | None = None,
        iclr_rank: int | None = None,
        value_rank: int | None = None,
        gate_rank: int | str | None = None,
        groupnorm: bool = False,
        decay_init: str = "across-heads",
        kernel_backend: str = "auto",
        cuda_graph_decode: bool = True,
        compile_decode: bool = True,
        compile_prefill: bool = True,
        prefill_chunk_tokens: int | None = 65536,
        use_cache: bool = True,
        init_k_k: float = 0.85,
        init_k_a: float = 1.0,
        init_a0: float = 0.0,
        init_v0: float = 1.0,
        **kwargs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown student architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        self.teacher_config = dict(teacher_config or {})
        self.softmax_layers = sorted(int(i) for i in softmax_layers)
        check_window(self.softmax_layers, softmax_window, softmax_sinks)
        # The softmax layers attend to the last softmax_window tokens and the first softmax_sinks
        # (None: to the whole context, a KV cache that grows with it).
        self.softmax_window = softmax_window
        self.softmax_sinks = softmax_sinks
        self.groupnorm = groupnorm
        if decay_init not in DECAY_INITS:
            raise ValueError(f"decay_init {decay_init!r}: choose one of {', '.join(DECAY_INITS)}")
        # The decay speeds' init (SPEC: RWKV-7's schedule): "across-heads" runs it once over all
        # heads' channels, so the first heads start slow and the last fast (with GQA, whole KV
        # groups); "per-head" runs it within each head, so every head starts with both.
        self.decay_init = decay_init
        self.kernel_backend = kernel_backend
        # Decode one token per step through a captured CUDA graph (pure linear students on CUDA).
        self.cuda_graph_decode = cuda_graph_decode
        # ... compiled with torch.compile first (the first decoding steps wait for it, see graphs.py).
        self.compile_decode = compile_decode
        # Prompts (more than one token, no autograd) on CUDA run through compiled layers (prefill.py).
        self.compile_prefill = compile_prefill
        # A forward without autograd over more tokens than this (batch x length) runs in pieces that
        # carry the state: a prefill's memory is a piece's (None: one pass; pieces are at least 64
        # positions long; a windowed hybrid's at most its window, models.prefill.piece_tokens).
        # Other hybrids and forwards returning all hidden states run in one pass.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # A forward given no use_cache returns the state (a cache) outside training, as
        # transformers' decoders return their KV cache (RadladsModel.forward).
        self.use_cache = use_cache
        self.init_k_k, self.init_k_a, self.init_a0, self.init_v0 = init_k_k, init_k_a, init_a0, init_v0
        for key in _MIRRORED:
            if key not in kwargs and key in self.teacher_config:
                kwargs[key] = self.teacher_config[key]
        hidden = kwargs.get("hidden_size", self.teacher_config.get("hidden_size", 64))
        given = {"decay_rank": decay_rank, "iclr_rank": iclr_rank, "value_rank": value_rank}
        for name, default in default_ranks(arch, hidden).items():
            setattr(self, name, given.get(name) or default)
        if gate_rank == "auto":
            self.gate_rank = gate_lora_rank(arch, hidden)
        elif gate_rank is not None:
            if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
                raise ValueError(f'gate_rank must be a positive int or "auto", not {gate_rank!r}')
            self.gate_rank = gate_rank
        self.head_dim = self.teacher_config.get("head_dim") or hidden // self.teacher_config.get(
            "num_attention_heads", kwargs.get("num_attention_heads", 1)
        )
        super().__init__(**kwargs)

    def teacher(self) -> PretrainedConfig:
        """The teacher family's config object (rebuilt from the stored dict), with the top level's
        mirrored fields, which HF helpers change there (resize_token_embeddings: vocab_size)."""
        cfg = dict(self.teacher_config)
        cfg.update({k: getattr(self, k) for k in _MIRRORED if k in cfg and hasattr(self, k)})
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def is_softmax_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.softmax_layers

    @property
    def softmax_kv_slots(self) -> int | None:
        """The keys a windowed softmax layer keeps per sequence, its window and sinks, from its first
        token on (models.attention); None: every key, a cache that grows."""
        return self.softmax_window + self.softmax_sinks if self.softmax_window else None


def check_window(softmax_layers, window: int | None, sinks: int, sinks_given: bool = False) -> None:
    """Refuse a window no layer can use: under 1 token, negative sinks, a window without softmax
    layers, or sinks asked for (`sinks_given`) without a window."""
    if (window is not None and window < 1) or sinks < 0:
        raise ValueError(
            f"softmax_window {window} / softmax_sinks {sinks}: give a window of at least 1 token "
            "(None for the whole context) and 0 or more sink tokens"
        )
    if window and not softmax_layers:
        raise ValueError(
            "softmax_window bounds the softmax layers' attention, but no layer keeps softmax attention: "
            "name some in softmax_layers (e.g. auto:2), or drop the window"
        )
    if sinks_given and not window:
        raise ValueError("softmax_sinks needs a window: give softmax_window too")


def window_overrides(path, window: int | None, sinks: int | None) -> dict:
    """`from_pretrained` keyword arguments that give the saved hybrid at `path` this window and
    these sinks (None: as saved), checked against its config first (read only where one is given)."""
    given = {k: v for k, v in (("softmax_window", window), ("softmax_sinks", sinks)) if v is not None}
    if given:
        config = AutoConfig.from_pretrained(path)
        window = window if window is not None else getattr(config, "softmax_window", None)
        sinks = sinks if sinks is not None else getattr(config, "softmax_sinks", 4)
        check_window(getattr(config, "softmax_layers", None), window, sinks, "softmax_sinks" in given)
    return given
