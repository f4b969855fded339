"""Training batches from a document stream tokenized on the fly (no pre-tokenization pass).

For corpora too large to tokenize up front (FineWeb-Edu through `datasets` streaming). The stream is
cut into *blocks* of `block_documents x world` documents. Rank r of w takes the documents r, r + w,
... of each block, tokenizes them (one `encode_batch`), joins them with EOS, cuts windows of
`seq_len + 1` tokens (stride `seq_len`; the tail shorter than a window is dropped), shuffles the
windows with a seed of (seed, epoch, block, rank) and serves them `batch_size` at a time. When the
stream ends, the next epoch starts over. A block's shuffle mixes only nearby documents: the
source's own order matters (shuffled corpora such as FineWeb-Edu are fine).

Exact resume. The state after every batch is {epoch, block, window} (plain ints) and travels with
the batch (`batch["state"]`), so what is saved is the position after the last batch *trained on*,
not after what the DataLoader prefetched. Resuming re-opens the stream, skips block x
block_documents x world documents (reading, not tokenizing, them), re-tokenizes that one block and
continues at the saved window: the same batches as without the interruption. Ranks stay in step
because every rank's block spans the same documents; a rank whose block yields fewer batches than
another's still takes part in every step (blocks are refilled independently), which is fine for
training but means the world size must be the same when resuming.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lrkv.data.packing import check_seq_len, pack_documents
from lrkv.errors import ConfigError, DataError

_STATE_VERSION = 1


class StreamLoader:
    """Batches `{"input", "target", "bytes", "state"}` from `documents()` (a fresh iterator of texts per call)."""

    def __init__(
        self,
        documents: Callable[[], Iterable[str]],
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block_documents: int = 1024,
        token_bytes: torch.Tensor | None = None,
    ):
        check_seq_len(seq_len)
        if batch_size < 1 or block_documents < 1:
            raise ConfigError(f"batch_size={batch_size} and block_documents={block_documents} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is outside world_size={world_size}")
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.block_documents = rank, world_size, block_documents
        self.token_bytes = None if token_bytes is None else np.asarray(token_bytes)

    # ---- state --------------------------------------------------------------------------------
    def initial_state(self) -> dict:
        return self._state(0, 0, 0)

    def _state(self, epoch: int, block: int, window: int) -> dict:
        return {
            "version": _STATE_VERSION,
            "kind": "stream",
            "epoch": epoch,
            "block": block,
            "window": window,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "block_documents": self.block_documents,
        }

    def check_state(self, state: dict) -> None:
        expected = self.initial_state()
        for key in ("kind", "seed", "seq_len", "world_size", "block_documents"):
            if state.get(key) != expected[key]:
                raise DataError(
                    f"data state was saved with {key}={state.get(key)!r}, this run has {expected[key]!r}; "
                    "resume with the same data settings and number of processes"
                )

    # ---- iteration ----------------------------------------------------------------------------
    def iter_batches(self, start: dict | None = None) -> Iterator[dict]:
        state = dict(start) if start else self.initial_state()
        self.check_state(state)
        epoch, block, window = state["epoch"], state["block"], state["window"]
        while True:
            served_any = False
            for block_index, windows in self._blocks(epoch, first_block=block):
                for w in range(window, len(windows) - self.batch_size + 1, self.batch_size):
                    served_any = True
                    yield self._batch(
                        windows[w : w + self.batch_size], self._state(epoch, block_index, w + self.batch_size)
                    )
                window = 0
            if not served_any and block == 0:
                raise DataError(
                    "the stream holds too few tokens for one batch of "
                    f"{self.batch_size} x {self.seq_len + 1} tokens per rank; lower seq_len or batch_size"
                )
            epoch, block, window = epoch + 1, 0, 0

    def _blocks(self, epoch: int, first_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(block index, shuffled windows of this rank) for the blocks of one pass over the stream."""
        per_block = self.block_documents * self.world_size
        docs = iter(self.documents())
        skipped = sum(1 for _ in itertools.islice(docs, first_block * per_block))  # read, not tokenized
        if skipped < first_block * per_block:
            return
        for block in itertools.count(first_block):
            texts = list(itertools.islice(docs, per_block))
            if not texts:
                return
            mine = texts[self.rank :: self.world_size]
            windows = self._windows(mine)
            order = np.random.default_rng([self.seed, epoch, block, self.rank]).permutation(len(windows))
            yield block, windows[order]

    def _windows(self, texts: list[str]) -> np.ndarray:
        tokens = pack_documents(self.tokenizer.encode_batch(texts) if texts else [], self.tokenizer.eos_id)
        n = max(0, (len(tokens) - 1) // self.seq_len)
        if n == 0:
            return np.zeros((0, self.seq_len + 1), dtype=np.int64)
        index = np.arange(n)[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        return tokens[index]

    def _batch(self, windows: np.ndarray, state: dict) -> dict:
        windows = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
        batch = {"input": windows[:, :-1].contiguous(), "target": windows[:, 1:].contiguous(), "state": state}
        if self.token_bytes is not None:
            batch["bytes"] = torch.from_numpy(self.token_bytes[windows[:, 1:].numpy()].sum(axis=1))
        return batch


class StreamDataset(IterableDataset):
    """A StreamLoader as a torch IterableDataset (one worker at most: the stream is sequential)."""

    def __init__(self, loader: StreamLoader, start: dict | None = None):
        self.loader, self.start = loader, start

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError("data.storage=stream reads one stream: use data.num_workers=0 or 1")
        return self.loader.iter_batches(self.start)


def make_stream_dataloader(
    loader: StreamLoader, start: dict | None = None, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    if num_workers > 1:
        raise ConfigError("data.storage=stream reads one stream: use data.num_workers=0 or 1 (1 overlaps tokenization)")
    return DataLoader(StreamDataset(loader, start), batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
