"""Data pipeline: corpora, tokenizer, packing, resumable sharded loaders, token shards.

Nothing here imports the model or Lightning; the LightningDataModule lives in
``lrkv.data.datamodule`` (import it from there).
"""

from lrkv.data.corpus import CorpusSpec, corpus_key, embedded_documents, is_validation, iter_documents
from lrkv.data.loader import BatchLoader, InMemoryTokens, LoaderDataset, TokenSource, make_dataloader
from lrkv.data.packing import inputs_and_targets, num_windows, pack_documents, token_dtype, window
from lrkv.data.shards import ShardTokens, load_or_write_shards, read_index, write_shards
from lrkv.data.tokenizer import (
    EOS_TOKEN,
    Tokenizer,
    encode_documents,
    load_or_train_bpe,
    padded_vocab_size,
    token_byte_lengths,
    train_bpe,
)

__all__ = [
    "EOS_TOKEN",
    "BatchLoader",
    "CorpusSpec",
    "InMemoryTokens",
    "LoaderDataset",
    "ShardTokens",
    "TokenSource",
    "Tokenizer",
    "corpus_key",
    "embedded_documents",
    "encode_documents",
    "inputs_and_targets",
    "is_validation",
    "iter_documents",
    "load_or_train_bpe",
    "load_or_write_shards",
    "make_dataloader",
    "num_windows",
    "pack_documents",
    "padded_vocab_size",
    "read_index",
    "token_byte_lengths",
    "token_dtype",
    "train_bpe",
    "window",
    "write_shards",
]
