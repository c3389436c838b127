"""Text -> token shards with the teacher's tokenizer, and packed batches for the trainer."""

from radlads.data.index import ShardIndex
from radlads.data.loader import PackedLoader
from radlads.data.shards import Source, prepare_shards
from radlads.data.text import iter_documents
from radlads.data.tokenizer import TokenizerMismatchError, check_tokenizer, check_vocab_size

__all__ = [
    "PackedLoader",
    "ShardIndex",
    "Source",
    "TokenizerMismatchError",
    "check_tokenizer",
    "check_vocab_size",
    "iter_documents",
    "prepare_shards",
]
