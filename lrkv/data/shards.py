"""Pre-tokenized token shards: tokenize a corpus once, then memory-map it for training.

Layout of a shard directory, per split (``train``, ``val``)::

    {split}-00000.bin  {split}-00001.bin ...   raw token ids, uint16 (vocab <= 65536) or uint32
    {split}.json                               index: dtype, files and token counts, tokenizer hash

Documents are written in source order, each followed by the end-of-text id, exactly as
``packing.pack_documents`` would join them; the loader then draws windows over the concatenation
of the files (``ShardTokens`` is a ``TokenSource`` for ``BatchLoader``, so order, sharding and
resume work as for in-memory tokens). Each file is written to a temporary name and renamed
(``os.replace``); the index is written last, so a directory with an index is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lrkv.data.packing import token_dtype
from lrkv.data.tokenizer import encode_documents
from lrkv.data.utils import atomic_write
from lrkv.errors import DataError

INDEX_VERSION = 1
DEFAULT_SHARD_TOKENS = 2**27  # 128M tokens: 256 MB of uint16 per file


def write_shards(
    texts: Iterable[str],
    tokenizer,
    directory: str,
    split: str,
    *,
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    chunk: int = 512,
    meta: dict | None = None,
) -> dict:
    """Tokenize ``texts`` into ``directory/{split}-NNNNN.bin`` files and write the index.

    Stops after the document that reaches ``max_tokens`` (EOS included). Returns the index.
    ``meta`` (JSON values) is stored in the index, e.g. the corpus key it was built from.
    """
    documents = (
        ids + [tokenizer.eos_id] for ids in encode_documents(tokenizer, texts, max_tokens=max_tokens, chunk=chunk)
    )
    dtype = token_dtype(tokenizer.vocab_size)
    return write_documents(documents, tokenizer, directory, split, dtype=dtype, shard_tokens=shard_tokens, meta=meta)


def write_documents(
    documents: Iterable[Sequence[int]],
    tokenizer,
    directory: str,
    split: str,
    *,
    dtype,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    meta: dict | None = None,
) -> dict:
    """Write already tokenized documents (each ending in its separator) as shards of ``split``.

    For masked chat data (lrkv/data/chat.py) the documents are int32 with ``~id`` marking the
    tokens that are not targets, and the separator is ``~eos``; ``dtype`` must hold them.
    """
    os.makedirs(directory, exist_ok=True)
    dtype = np.dtype(dtype)
    files, pending, pending_tokens, total, count = [], [], 0, 0, 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if pending_tokens:
            name = f"{split}-{len(files):05d}.bin"
            atomic_write(os.path.join(directory, name), np.concatenate(pending))
            files.append({"name": name, "tokens": pending_tokens})
        pending, pending_tokens = [], 0

    for ids in documents:
        doc = np.asarray(ids, dtype=dtype)
        pending.append(doc)
        pending_tokens += len(doc)
        total += len(doc)
        count += 1
        if pending_tokens >= shard_tokens:
            flush()
    flush()
    index = {
        "version": INDEX_VERSION,
        "split": split,
        "dtype": dtype.str,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.sha256,
        "num_tokens": total,
        "num_documents": count,
        "files": files,
        "meta": meta or {},
    }
    atomic_write(index_path(directory, split), json.dumps(index, indent=1))
    return index


def shard_directory(cache_dir: str, key: dict) -> str:
    """``cache_dir/shards/<16 hex digits of the key's hash>``: one directory per corpus and settings."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "shards", digest)


def index_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.json")


def read_index(directory: str, split: str) -> dict:
    """The shard index of one split; DataError naming the fix if it is missing or unreadable."""
    path = index_path(directory, split)
    if not os.path.isfile(path):
        raise DataError(
            f"no token shards for split {split!r} in {directory!r} (missing "
            f"{os.path.basename(path)}): build them with lrkv.data.shards.write_shards "
            "or set data.storage=memory"
        )
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable shard index {path!r}: {e}; delete the directory to rebuild") from e
    if index.get("version") != INDEX_VERSION:
        raise DataError(
            f"shard index {path!r} has version {index.get('version')}, expected "
            f"{INDEX_VERSION}: delete the directory to rebuild"
        )
    return index


def load_or_write_shards(
    texts: Callable[[], Iterable[str]] | None,
    tokenizer,
    directory: str,
    split: str,
    *,
    documents: Callable[[], Iterable[Sequence[int]]] | None = None,
    dtype=None,
    **write_kwargs,
) -> ShardTokens:
    """Open the shards of ``split`` in ``directory``, writing them when missing or made with another
    tokenizer: from ``texts()``, or from already tokenized ``documents()`` of ``dtype`` (see
    ``write_documents``). ``directory`` should be keyed by the corpus and settings (``shard_directory``)."""
    path = index_path(directory, split)
    made_with = read_index(directory, split)["tokenizer_sha256"] if os.path.isfile(path) else None
    if made_with != tokenizer.sha256:
        if documents is not None:
            write_documents(documents(), tokenizer, directory, split, dtype=dtype, **write_kwargs)
        else:
            write_shards(texts(), tokenizer, directory, split, **write_kwargs)
    return ShardTokens(directory, split, tokenizer_sha256=tokenizer.sha256)


class ShardTokens:
    """Token shards of one split, memory-mapped read-only; the same stream every epoch.

    ``tokenizer_sha256``, if given, must match the index (DataError otherwise): shards made with
    another tokenizer would silently train on wrong ids.
    """

    def __init__(self, directory: str, split: str, *, tokenizer_sha256: str | None = None):
        self.index = read_index(directory, split)
        if tokenizer_sha256 is not None and self.index["tokenizer_sha256"] != tokenizer_sha256:
            raise DataError(
                f"token shards in {directory!r} were made with another tokenizer: "
                "delete them to rebuild, or use the tokenizer they were made with"
            )
        self.dtype = np.dtype(self.index["dtype"])
        self.arrays = []
        for entry in self.index["files"]:
            path = os.path.join(directory, entry["name"])
            size = entry["tokens"] * self.dtype.itemsize
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise DataError(f"token shard {path!r} is missing or truncated: delete {directory!r} to rebuild")
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.ends = np.cumsum([len(a) for a in self.arrays], dtype=np.int64)
        self.num_documents = int(self.index["num_documents"])

    def num_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, epoch: int, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated files (epoch is ignored)."""
        pieces = []
        while length > 0 and start < self.num_tokens():
            i = int(np.searchsorted(self.ends, start, side="right"))
            file_start = int(self.ends[i - 1]) if i else 0
            piece = self.arrays[i][start - file_start : start - file_start + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)
