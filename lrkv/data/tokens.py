"""The tokens of one split of one corpus, held as `data.storage` says.

Used for a single corpus (``data=local``, ``data=fineweb_edu``, ``data=chat``, ...) and for every source of
a mixture (lrkv/data/mixture.py), so both store their data the same way:

- ``memory``: tokenized at setup into RAM (``InMemoryTokens``); the training split's documents are put in a
  new seeded order every epoch.
- ``shards``: tokenized once into memory-mapped files under ``cache_dir/shards/<hash>`` (lrkv/data/shards.py),
  the hash taken over the corpus, the format, the tokenizer and the token caps, so every run with the same
  data reuses them; documents stay in source order (the loader still draws windows in a seeded order).

Documents are plain text (``fmt="text"``) or conversations rendered with the chat template and masked for an
assistant-only loss (the chat formats of lrkv/data/chat.py: int32 with ``~id`` marking non-targets).
``stream`` storage is the datamodule's own (lrkv/data/stream.py) and is not handled here.
"""

from __future__ import annotations

import numpy as np

from lrkv.data.corpus import CorpusSpec, corpus_key, iter_documents
from lrkv.data.loader import InMemoryTokens
from lrkv.data.shards import load_or_write_shards, shard_directory
from lrkv.errors import ConfigError


def split_tokens(
    corpus: CorpusSpec,
    split: str,
    tokenizer,
    *,
    fmt: str = "text",
    storage: str = "memory",
    max_tokens: int | None = None,
    val_max_tokens: int | None = None,
    cache_dir: str = ".cache/lrkv",
    seed: int = 0,
    shuffle: bool | None = None,
):
    """A ``TokenSource`` (``InMemoryTokens`` or ``ShardTokens``) of ``split`` ("train" or "val").

    ``max_tokens`` caps the training split, ``val_max_tokens`` the validation split (both are part of the
    shard key, so changing either makes new shards). ``shuffle`` (memory only; default: the training split)
    puts the documents in a new seeded order every epoch; False keeps the source order (held-out scoring).
    """
    cap = max_tokens if split == "train" else val_max_tokens
    shuffle = split == "train" if shuffle is None else shuffle
    if storage == "memory":
        if fmt == "text":
            return InMemoryTokens.from_texts(
                iter_documents(corpus, split), tokenizer, max_tokens=cap, shuffle_documents=shuffle, seed=seed
            )
        return _chat_memory(corpus, split, tokenizer, fmt, cap, shuffle, seed)
    if storage != "shards":
        raise ConfigError(f"storage={storage!r} cannot be held as split tokens: use 'memory' or 'shards'")
    key = {"corpus": corpus_key(corpus), "tokenizer": tokenizer.sha256, "max_tokens": max_tokens}
    key["val_max_tokens"] = val_max_tokens
    if fmt != "text":
        key["format"] = fmt  # text keys stay as they were: existing shard caches remain valid
    directory = shard_directory(cache_dir, key)
    if fmt == "text":
        return load_or_write_shards(
            lambda: iter_documents(corpus, split), tokenizer, directory, split, max_tokens=cap, meta=key
        )
    return load_or_write_shards(
        None,
        tokenizer,
        directory,
        split,
        documents=lambda: _chat_documents(corpus, split, tokenizer, fmt, cap),
        dtype=np.int32,
        meta=key,
    )


def _chat_documents(corpus, split, tokenizer, fmt, cap):
    """Masked conversations, each followed by the separator ~eos (an end-of-text that is not a target)."""
    from lrkv.data.chat import conversation_documents, iter_rows

    for doc in conversation_documents(iter_rows(corpus, split), tokenizer, fmt, cap):
        yield np.append(doc, ~tokenizer.eos_id).astype(np.int32)


def _chat_memory(corpus, split, tokenizer, fmt, cap, shuffle, seed):
    from lrkv.data.chat import chat_tokens, iter_rows

    rows = iter_rows(corpus, split)
    return chat_tokens(rows, tokenizer, fmt=fmt, max_tokens=cap, shuffle_documents=shuffle, seed=seed)
