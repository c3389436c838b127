"""Identify the tokenizer that produced a shard, so training never mixes token ids."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from radlads.data.index import ShardIndex

TokenizerLike = PreTrainedTokenizerBase | str | os.PathLike[str]

logger = logging.getLogger(__name__)


class TokenizerMismatchError(ValueError):
    """The shards were tokenized with a different tokenizer than the model's."""


def load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return AutoTokenizer.from_pretrained(os.fspath(tokenizer))


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides token ids: the tokenization pipeline (or vocab) and the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec: Any = json.loads(backend.to_str())
        # Truncation and padding are call-time settings; they do not change the ids of a text.
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"tokenizer": spec, "eos_id": tokenizer.eos_token_id}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# Text on which tokenizers that differ in any step of their pipeline (normalizer, pre-tokenizer,
# model, special tokens) almost surely differ: cases, digits, runs of whitespace, punctuation,
# accents composed and decomposed, ligatures and full-width forms, several scripts, emoji, code and
# special-token strings.
PROBE = (
    "Hello, World! HELLO world.\n\n\tTabs  and   spaces; 0123456789 3.14159 1,000,000 $42.50 100% "
    "#tag @user a.b@c.de https://example.org/p?q=1&r=2\r\n"
    "Caf\u00e9 cafe\u0301 na\u00efve \u00c6r\u00f8sk\u00f8bing stra\u00dfe \ufb01 \u2460 \u00bd "
    "x\u00b2 \uff26\uff55\uff4c\uff4c\n"
    "\u0391\u03b8\u03ae\u03bd\u03b1 \u041c\u043e\u0441\u043a\u0432\u0430 \u6771\u4eac "
    "\uc11c\uc6b8 \u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627 "
    "\u05e9\u05dc\u05d5\u05dd \U0001f642\U0001f44d\U0001f3fd \u2014 \u201cquotes\u201d \u2026 "
    "<|endoftext|> </s> <s> [INST] def f(x):\n    return x ** 2  # code\n"
)


def tokenizer_ids_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary, the EOS id and the ids of PROBE, as the shards encode text: what
    a tokenizer does rather than how a tokenizers release writes it down (`tokenizer_hash`)."""
    probe = tokenizer(PROBE, add_special_tokens=False, verbose=False)["input_ids"]
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "eos_id": tokenizer.eos_token_id, "probe": probe})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def made_with(index: ShardIndex, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` gives the ids the shards hold: the same pipeline, or (for shards whose
    index records it) one with the same vocabulary that encodes PROBE alike. A tokenizers release
    that writes the same pipeline's JSON differently (a new field, a default spelled out) changes
    the first hash but not the second, and re-tokenizing a large corpus for it would waste hours."""
    if tokenizer_hash(tokenizer) == index.tokenizer_hash:
        return True
    if index.tokenizer_ids_hash is None or tokenizer_ids_hash(tokenizer) != index.tokenizer_ids_hash:
        return False
    logger.info(
        "the tokenizer's pipeline is written differently from when %s was tokenized (another "
        "tokenizers release?), but its vocabulary and ids match: using the shards",
        index.directory,
    )
    return True


def check_tokenizer(index: ShardIndex, tokenizer: TokenizerLike) -> None:
    """Raise TokenizerMismatchError unless `tokenizer` is the one the shards were made with."""
    tok = load_tokenizer(tokenizer)
    if made_with(index, tok):
        return
    raise TokenizerMismatchError(
        f"the data shards were tokenized with '{index.tokenizer_name}' "
        f"(hash {index.tokenizer_hash[:12]}), but the model uses '{tok.name_or_path}' "
        f"(hash {tokenizer_hash(tok)[:12]}). Token ids would not match: re-run "
        "`radlads prepare-data` with the teacher's tokenizer."
    )


def check_vocab_size(index: ShardIndex, model_vocab_size: int) -> None:
    """Raise TokenizerMismatchError if the shards hold ids past the model's embedding rows."""
    if index.vocab_size <= model_vocab_size:
        return
    raise TokenizerMismatchError(
        f"the data shards in {index.directory} were tokenized with '{index.tokenizer_name}' "
        f"({index.vocab_size} tokens), more than the teacher's {model_vocab_size} embeddings: "
        "re-run `radlads prepare-data` with the teacher's tokenizer."
    )
