"""Tiny random teachers built from configs: no hub, no download."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # Trained attention is peaked; the default 0.02 init gives near-uniform attention that no
    # linear attention resembles, so tiny teachers use a wider init.
    initializer_range=0.2,
)

TEACHERS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False)),
}


def make_teacher(family: str = "qwen2", seed: int = 0, **overrides):
    config_cls, model_cls, extra = TEACHERS[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


WORDS = (
    "the a one every some cat dog bird fish student teacher model layer state token river mountain city "
    "runs sleeps learns reads writes sees finds keeps small large quick slow red green old new and but "
    "because while when then there here today tomorrow quietly loudly"
).split()


def write_corpus(folder, documents: int = 300, seed: int = 0):
    """Plain-text documents of loosely grammatical sentences: a corpus with learnable structure."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            n = rng.randint(4, 11)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        (folder / f"doc{d:04d}.txt").write_text(" ".join(sentences) + "\n")
    return folder


def make_teacher_folder(tmp_path, family: str = "qwen2", **overrides):
    """A tiny teacher saved as an HF folder with a real (tiny, byte-level BPE) tokenizer."""
    from transformers import AutoTokenizer

    from tokenizer_fixture import make_tiny_tokenizer

    tok_dir = make_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = -(-len(tokenizer) // 64) * 64
    teacher = make_teacher(family, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, **overrides)
    folder = tmp_path / f"teacher-{family}"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
