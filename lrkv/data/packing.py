"""Packing: documents -> one token stream with end-of-text separators -> fixed-length windows.

Every document is followed by ``eos_id`` and the documents are concatenated (no padding). The
stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``: window ``i`` covers
tokens ``[i*seq_len, i*seq_len + seq_len]``, its first ``seq_len`` tokens are the input and its last
``seq_len`` the target. Consecutive windows share one token, so every token after the first is a
target exactly once: the bytes of a split add up without gaps or double counting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from lrkv.errors import ConfigError


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for token ids: uint16 below 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def pack_documents(token_docs: Iterable[Sequence[int]], eos_id: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, into one 1-D array."""
    parts = []
    for ids in token_docs:
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many full windows of ``seq_len + 1`` tokens with stride ``seq_len`` fit in the stream."""
    check_seq_len(seq_len)
    return max(0, (num_tokens - 1) // seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Window ``index`` of the stream: ``seq_len + 1`` tokens starting at ``index * seq_len``."""
    start = index * seq_len
    out = tokens[start : start + seq_len + 1]
    if len(out) != seq_len + 1:
        raise IndexError(f"window {index} runs past the end of a {len(tokens)}-token stream")
    return out


def inputs_and_targets(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (B, seq_len + 1) windows into inputs (B, seq_len) and targets shifted by one."""
    return windows[:, :-1], windows[:, 1:]


def check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be >= 1")
