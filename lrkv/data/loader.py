"""Batches of packed windows: seeded order, data-parallel sharding, exact resume from a JSON state.

Positions. A ``TokenSource`` gives one token stream per epoch (same length each epoch, order may
change). Epoch ``e`` is cut into ``W_e`` windows (see ``packing``) after a seeded start offset in
``[0, seq_len)``, and the windows are visited in a seeded permutation; without ``shuffle`` the
offset is 0 and the order sequential. The position of the next window to serve is
``(epoch, index)``, counted over *all* ranks: batch ``k`` after position ``P`` is made of the
windows ``P + (k*B + j)*world + rank`` for ``j < B``. So rank ``r`` of ``w`` sees a disjoint part,
the ranks together see every window of an epoch, and each rank's stream depends only on
(seed, position). All ranks step together, so the state is the same on every rank, and a run
may resume with another world size or batch size without repeating or skipping windows.

State. ``state_dict()`` is ``{"epoch", "index"}`` plus the settings it is only valid for (seed,
seq_len, shuffle, token count), all plain ints/bools: JSON-serialisable. Restoring it yields
exactly the batches an uninterrupted loader would have yielded.

Training iterates forever over epochs (``infinite=True``); validation makes one deterministic pass
over epoch 0 (``infinite=False``): each rank gets ``W // world`` windows (at most ``world - 1``
windows are left out so that every rank runs the same number of batches), the last batch may be
smaller than ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lrkv.data.packing import check_seq_len, num_windows, pack_documents, token_dtype
from lrkv.data.tokenizer import encode_documents
from lrkv.errors import ConfigError, DataError

_STATE_VERSION = 1
# Independent random streams per (seed, epoch): see _rng.
_OFFSET, _ORDER, _DOCUMENTS = 0, 1, 2


class TokenSource(Protocol):
    """One token stream per epoch; the length is the same for every epoch."""

    def num_tokens(self) -> int: ...

    def read(self, epoch: int, start: int, length: int) -> np.ndarray: ...


class InMemoryTokens:
    """Tokenized documents held in memory; optionally in a new seeded document order per epoch.

    Shuffling documents (not only windows) changes where windows cut the text each epoch.
    """

    def __init__(
        self,
        token_docs: Iterable[Sequence[int]],
        eos_id: int,
        *,
        shuffle_documents: bool = False,
        seed: int = 0,
        dtype: np.dtype | type = np.int64,
    ):
        docs = [np.asarray(d, dtype=dtype) for d in token_docs]
        self.tokens = pack_documents(docs, eos_id, dtype)  # documents in source order
        self.doc_starts = np.cumsum([0] + [len(d) + 1 for d in docs])
        self.num_documents = len(docs)
        self.shuffle_documents = shuffle_documents
        self.seed = _check_seed(seed)
        self._epochs: dict[int, np.ndarray] = {}

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer,
        *,
        max_tokens: int | None = None,
        shuffle_documents: bool = False,
        seed: int = 0,
        chunk: int = 512,
    ) -> InMemoryTokens:
        """Tokenize texts in chunks (``encode_batch``), stopping after the document that reaches
        ``max_tokens`` tokens (EOS included)."""
        dtype = token_dtype(tokenizer.vocab_size)
        docs = [
            np.asarray(ids, dtype=dtype)
            for ids in encode_documents(tokenizer, texts, max_tokens=max_tokens, chunk=chunk)
        ]
        return cls(docs, tokenizer.eos_id, shuffle_documents=shuffle_documents, seed=seed, dtype=dtype)

    def num_tokens(self) -> int:
        return len(self.tokens)

    def read(self, epoch: int, start: int, length: int) -> np.ndarray:
        return self._epoch_tokens(epoch)[start : start + length]

    def _epoch_tokens(self, epoch: int) -> np.ndarray:
        if not self.shuffle_documents:
            return self.tokens
        if epoch not in self._epochs:
            order = _rng(self.seed, epoch, _DOCUMENTS).permutation(self.num_documents)
            starts, ends = self.doc_starts[:-1][order], self.doc_starts[1:][order]
            self._epochs = {e: t for e, t in self._epochs.items() if e == epoch - 1}  # keep 2
            self._epochs[epoch] = np.concatenate([self.tokens[s:e] for s, e in zip(starts, ends)])
        return self._epochs[epoch]


class BatchLoader:
    """Batches ``{"input", "target"[, "bytes"]}`` of packed windows from a ``TokenSource``.

    ``input`` and ``target`` are LongTensors (rows, seq_len), ``target`` is ``input`` shifted by one;
    ``bytes`` (given ``token_bytes``, see ``token_byte_lengths``) is a LongTensor (rows,) with the
    UTF-8 bytes covered by each row's targets, for bits-per-byte. See the module docstring for the
    order, sharding and state.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        token_bytes: torch.Tensor | None = None,
        max_batches: int | None = None,
    ):
        check_seq_len(seq_len)
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is outside world_size={world_size}")
        if max_batches is not None and (infinite or max_batches < 0):
            raise ConfigError("max_batches applies to a finite (validation) loader only, and >= 0")
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.seed, self.shuffle, self.infinite = _check_seed(seed), shuffle, infinite
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.token_bytes = None if token_bytes is None else token_bytes.to(torch.long).numpy()
        self._perms: dict[int, np.ndarray] = {}
        self._offsets: dict[int, int] = {}
        windows = self._windows(0)
        if windows < world_size:
            raise DataError(
                f"too little data: {source.num_tokens()} tokens make {windows} windows "
                f"of seq_len+1={seq_len + 1} for {world_size} rank(s); lower seq_len or "
                "add documents (raise max_documents / val_fraction)"
            )
        self._position = (0, 0)

    # ------------------------------------------------------------------ public interface

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current state on; the state follows each batch as it is yielded.

        A finite loader that finished its pass starts the next pass from the beginning.
        """
        if not self.infinite and self._position[1] >= self._end_index():
            self._position = (0, 0)
        for batch in self.iter_batches(self.state_dict()):
            self._position = self._after(self._position, 1)
            yield batch

    def iter_batches(
        self, start: dict | None = None, first: int = 0, stride: int = 1
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``first, first + stride, ...`` counted from the state ``start`` (default: the
        beginning). Does not change this loader's state; DataLoader workers use ``stride``."""
        position = self._position_of(start) if start is not None else (0, 0)
        per_batch = self.batch_size * self.world_size
        position = self._advance(position, first * per_batch)
        while rows := self._rows(position):
            yield self._batch(rows)
            position = self._advance(position, stride * per_batch)

    def __len__(self) -> int:
        """Batches in one pass of a finite loader (from the beginning)."""
        if self.infinite:
            raise TypeError("an infinite training loader has no length; count steps instead")
        return -(-self._end_index() // (self.batch_size * self.world_size))

    def state_dict(self) -> dict:
        """JSON-serialisable position of the next batch, with the settings it is valid for."""
        return self._state(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._position = self._position_of(state)

    def state_after(self, num_batches: int, start: dict | None = None) -> dict:
        """The state after ``num_batches`` batches served from ``start`` (default: the beginning),
        without reading tokens: lets a caller track what was consumed, not what was prefetched."""
        position = self._position_of(start) if start is not None else (0, 0)
        return self._state(self._after(position, num_batches))

    def epoch_windows(self, epoch: int = 0) -> int:
        """Windows in one epoch over all ranks."""
        return self._windows(epoch)

    # ------------------------------------------------------------------ positions

    def _state(self, position: tuple[int, int]) -> dict:
        return {
            "version": _STATE_VERSION,
            "epoch": position[0],
            "index": position[1],
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_tokens": self.source.num_tokens(),
        }

    def _position_of(self, state: dict) -> tuple[int, int]:
        expected = self._state((0, 0))
        for key in ("version", "seed", "seq_len", "shuffle", "num_tokens"):
            if state.get(key) != expected[key]:
                raise DataError(
                    f"data state was saved with {key}={state.get(key)!r} but this run "
                    f"has {expected[key]!r}: resume with the same data settings, or "
                    "start the data stream fresh"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0 or (not self.infinite and epoch != 0):
            raise DataError(f"data state position ({epoch}, {index}) is invalid for this loader")
        return epoch, index

    def _offset(self, epoch: int) -> int:
        """Start of window 0 in the epoch's stream: random in [0, seq_len) when shuffling."""
        if not self.shuffle:
            return 0
        if epoch not in self._offsets:
            self._offsets[epoch] = int(_rng(self.seed, epoch, _OFFSET).integers(self.seq_len))
        return self._offsets[epoch]

    def _windows(self, epoch: int) -> int:
        return num_windows(self.source.num_tokens() - self._offset(epoch), self.seq_len)

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # keep 2
            self._perms[epoch] = _rng(self.seed, epoch, _ORDER).permutation(self._windows(epoch))
        return self._perms[epoch]

    def _advance(self, position: tuple[int, int], n: int) -> tuple[int, int]:
        """``n`` windows further; an infinite loader rolls over into the next epochs."""
        epoch, index = position[0], position[1] + n
        while self.infinite and index >= (w := self._windows(epoch)):
            index -= w
            epoch += 1
        return epoch, index

    def _after(self, position: tuple[int, int], num_batches: int) -> tuple[int, int]:
        """The position after ``num_batches`` batches (a finite pass stops at its end)."""
        epoch, index = self._advance(position, num_batches * self.batch_size * self.world_size)
        return (epoch, index) if self.infinite else (0, min(index, self._end_index()))

    def _end_index(self) -> int:
        """Where a finite pass over epoch 0 ends: every rank gets the same number of windows."""
        per_rank = self._windows(0) // self.world_size
        if self.max_batches is not None:
            per_rank = min(per_rank, self.max_batches * self.batch_size)
        return per_rank * self.world_size

    def _rows(self, position: tuple[int, int]) -> list[tuple[int, int]]:
        """Positions of this rank's rows in the batch starting at ``position``; [] past the end."""
        offsets = [j * self.world_size + self.rank for j in range(self.batch_size)]
        if self.infinite:
            return [self._advance(position, o) for o in offsets]
        end = self._end_index()
        return [(0, position[1] + o) for o in offsets if position[1] + o < end]

    # ------------------------------------------------------------------ reading

    def _read_window(self, position: tuple[int, int]) -> np.ndarray:
        epoch, index = position
        order = self._order(epoch)
        slot = index if order is None else int(order[index])
        start = self._offset(epoch) + slot * self.seq_len
        tokens = self.source.read(epoch, start, self.seq_len + 1)
        if len(tokens) != self.seq_len + 1:
            raise DataError(f"short read at token {start} of epoch {epoch}: the token source changed size; rebuild it")
        return tokens

    def _batch(self, rows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        windows = np.stack([self._read_window(p) for p in rows]).astype(np.int64)
        if windows.min(initial=0) < 0:  # masked chat data (lrkv/data/chat.py): ~id marks a non-target token
            inputs, targets = decode_windows(windows)
            batch = {"input": torch.from_numpy(inputs.copy()), "target": torch.from_numpy(targets.copy())}
            if self.token_bytes is not None:
                batch["bytes"] = torch.from_numpy((self.token_bytes[np.maximum(targets, 0)] * (targets >= 0)).sum(1))
            return batch
        batch = {"input": torch.from_numpy(windows[:, :-1].copy()), "target": torch.from_numpy(windows[:, 1:].copy())}
        if self.token_bytes is not None:
            batch["bytes"] = torch.from_numpy(self.token_bytes[windows[:, 1:]].sum(axis=1))
        return batch


class LoaderDataset(IterableDataset):
    """A ``BatchLoader`` as a torch IterableDataset (use ``DataLoader(batch_size=None)``).

    Worker ``w`` of ``n`` yields batches ``w, w + n, ...`` from ``start``; the DataLoader takes them
    round-robin, so any ``num_workers`` gives the same batches in the same order.
    """

    def __init__(self, loader: BatchLoader, start: dict | None = None):
        self.loader = loader
        self.start = start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        first, stride = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.loader.iter_batches(self.start, first=first, stride=stride)


def make_dataloader(
    loader: BatchLoader, start: dict | None = None, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A torch DataLoader yielding the loader's batches from ``start`` (already batched)."""
    return DataLoader(
        LoaderDataset(loader, start),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def _check_seed(seed: int) -> int:
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    return int(seed)


def decode_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, seq_len + 1) stored windows -> inputs (ids) and targets (-1 where not a training target)."""
    ids = np.where(windows < 0, ~windows, windows)
    targets = np.where(windows[:, 1:] < 0, -1, windows[:, 1:])
    return ids[:, :-1], targets
