"""Identify the tokenizer that produced a shard, so training never mixes token ids."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from radlads.data.index import ShardIndex

TokenizerLike = PreTrainedTokenizerBase | str | os.PathLike[str]


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


def check_tokenizer(index: ShardIndex, tokenizer: TokenizerLike) -> None:
    """Raise TokenizerMismatchError unless `tokenizer` is the one the shards were made with."""
    tok = load_tokenizer(tokenizer)
    if tokenizer_hash(tok) == index.tokenizer_hash:
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
