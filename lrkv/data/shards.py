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

import json
import os
from collections.abc import Callable, Iterable

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
    os.makedirs(directory, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    files, pending, pending_tokens, total, documents = [], [], 0, 0, 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if pending_tokens:
            name = f"{split}-{len(files):05d}.bin"
            atomic_write(os.path.join(directory, name), np.concatenate(pending))
            files.append({"name": name, "tokens": pending_tokens})
        pending, pending_tokens = [], 0

    for ids in encode_documents(tokenizer, texts, max_tokens=max_tokens, chunk=chunk):
        doc = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
        pending.append(doc)
        pending_tokens += len(doc)
        total += len(doc)
        documents += 1
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
        "num_documents": documents,
        "files": files,
        "meta": meta or {},
    }
    atomic_write(index_path(directory, split), json.dumps(index, indent=1))
    return index


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
    texts: Callable[[], Iterable[str]], tokenizer, directory: str, split: str, **write_kwargs
) -> ShardTokens:
    """Open the shards of ``split`` in ``directory``, writing them from ``texts()`` when missing
    or made with another tokenizer. ``directory`` should be keyed by the corpus and settings."""
    path = index_path(directory, split)
    made_with = read_index(directory, split)["tokenizer_sha256"] if os.path.isfile(path) else None
    if made_with != tokenizer.sha256:
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
