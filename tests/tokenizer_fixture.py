"""Tiny tokenizers built offline, for tests that need a real Hugging Face tokenizer folder."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"

SENTENCES = [
    "The cat sat on the mat.",
    "A linear attention student learns from a softmax attention teacher.",
    "Distillation aligns hidden states, then logits, then extends the context.",
    "Tokens are packed into windows separated by end-of-text markers.",
    "Hello world! Numbers like 12345 and symbols like #, % and & appear too.",
]


def make_tiny_tokenizer(tmp_path: Path) -> Path:
    """Train a byte-level BPE (any text encodes) with an EOS token; save it; return the folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return save(tok, Path(tmp_path) / "tiny-tokenizer")


def make_wordlevel_tokenizer(tmp_path: Path, vocab_size: int) -> Path:
    """Whitespace word-level tokenizer whose words are w0 ... w{vocab_size-3}, plus <unk> and EOS."""
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<unk>"] = vocab_size - 2
    vocab[EOS] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return save(tok, Path(tmp_path) / f"wordlevel-{vocab_size}")


def save(tok: Tokenizer, folder: Path) -> Path:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(folder)
    return folder
