"""LightningDataModule over the data pipeline (the only data module that imports Lightning).

Built from plain arguments (Hydra can fill them from ``configs/data/*.yaml``). ``prepare_data``
(one process per node) trains or loads the cached tokenizer and, with ``storage="shards"``, writes
the token shards; ``setup`` loads them on every rank and builds the loaders.

Exact resume. Lightning fetches one batch ahead of the one being trained on, so the position of the
train loader is not what was consumed. The module therefore counts the training batches that reach
``on_before_batch_transfer`` (called once per batch actually used, in the main process) and its
``state_dict()`` is the loader state after that many batches from where the dataloader started.
Lightning stores it in the checkpoint and calls ``load_state_dict`` before ``train_dataloader``
on resume, so training continues with exactly the batch after the last one trained on. This holds
for any ``num_workers``: worker ``w`` of ``n`` produces batches ``w, w + n, ...`` and the DataLoader
hands them out in order. A LightningModule must not override ``on_before_batch_transfer`` itself
(Lightning would then call the datamodule's anyway, with a warning: keep the logic there).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lrkv.data.corpus import CorpusSpec, corpus_key, iter_documents, source_kind
from lrkv.data.loader import BatchLoader, make_dataloader
from lrkv.data.mixture import Mixture, is_mixture
from lrkv.data.stream import StreamLoader, make_stream_dataloader
from lrkv.data.tokenizer import Tokenizer, load_or_train_bpe, padded_vocab_size, token_byte_lengths
from lrkv.data.tokens import split_tokens
from lrkv.errors import ConfigError, DataError

STORAGES = ("memory", "shards", "stream")


class LMDataModule(L.LightningDataModule):
    """Packed next-token batches ``{"input", "target", "bytes"}`` for language-model training.

    Corpus (see ``CorpusSpec``): source, name, split, val_split, text_field, txt_unit,
        val_fraction, split_seed, streaming, max_documents.
    max_tokens / val_max_tokens: stop reading each split after about that many tokens.
    tokenizer: "bpe" to train (and cache) a byte-level BPE of ``vocab_size`` on the training split
        (at most ``tokenizer_max_chars`` characters), or a path to a tokenizer.json or a directory
        with tokenizer.json or GPT-2 style vocab.json + merges.txt.
    seq_len, batch_size: per-rank micro batch of ``batch_size`` rows of ``seq_len`` tokens.
    val_batch_size (default batch_size), val_batches: cap on validation batches per pass.
    seed: order of the training stream (documents and windows per epoch). The split has its own
        ``split_seed`` so that runs with different seeds validate on the same documents.
    storage: "memory" (tokenize into RAM at setup), "shards" (tokenize once into memory-mapped
        files under ``cache_dir``, reused by later runs) or "stream" (training documents streamed and
        tokenized on the fly in blocks of ``block_documents`` per rank, see ``lrkv.data.stream``;
        validation in memory). Stream states are per rank and saved for every rank.
    rank, world_size: data-parallel position; default from torch.distributed when initialised
        (Lightning initialises it before ``setup``), else the trainer, else 0 of 1.
    """

    def __init__(
        self,
        source: str = "embedded",
        *,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        text_field: str = "text",
        txt_unit: str = "document",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        streaming: bool = True,
        max_documents: int | None = None,
        val_documents: int | None = None,
        block_documents: int = 1024,
        max_tokens: int | None = None,
        val_max_tokens: int | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        tokenizer_max_chars: int | None = 100_000_000,
        seq_len: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_batches: int | None = None,
        seed: int = 0,
        storage: str = "memory",
        cache_dir: str = ".cache/lrkv",
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        sources: list | None = None,
        format: str = "text",
    ):
        super().__init__()
        self.save_hyperparameters()
        if storage not in STORAGES:
            raise ConfigError(f"storage={storage!r} is unknown: use 'memory', 'shards' or 'stream'")
        if format != "text":  # data=chat (lrkv/data/chat.py): conversations, assistant-only loss
            from lrkv.data.chat import FORMATS

            if format not in FORMATS:
                raise ConfigError(f"data.format={format!r} is unknown: use text, {', '.join(FORMATS)}")
            if storage == "stream":
                raise ConfigError(f"data.format={format} supports data.storage=memory or shards, not stream")
            if is_mixture(source, sources):
                raise ConfigError(
                    f"data.format={format} is for a single source; in a mixture give the source its own format"
                )
        self.mixture = None  # data=mixture (lrkv/data/mixture.py): several sources drawn by weight
        if is_mixture(source, sources):
            if storage == "stream":
                raise ConfigError("data=mixture supports data.storage=memory or shards, not stream")
            self.mixture = Mixture(
                sources, val_fraction=val_fraction, split_seed=split_seed, storage=storage, cache_dir=cache_dir
            )
            source = "embedded"  # placeholder corpus spec; the mixture's sources are used instead
        self.spec = CorpusSpec(
            source=source,
            name=name,
            split=split,
            val_split=val_split,
            val_fraction=val_fraction,
            split_seed=split_seed,
            text_field=text_field,
            txt_unit=txt_unit,
            streaming=streaming,
            max_documents=max_documents,
            val_documents=val_documents,
        )
        if source_kind(source) == "hub" and max_documents is None:
            # A held-out split by hash is spread over the whole stream: without a cap, collecting
            # it reads the entire dataset. In memory, the training split needs a cap as well.
            if val_split is None and val_max_tokens is None and val_documents is None:
                raise ConfigError(
                    f"data.source={source!r} streams a hub dataset: set "
                    "data.val_documents (e.g. 5000), data.val_max_tokens or data.val_split"
                )
            if storage == "memory" and max_tokens is None:
                raise ConfigError(
                    f"data.source={source!r} streams a hub dataset: set "
                    "data.max_tokens to hold it in memory, or use storage=stream or shards"
                )
        self.tokenizer: Tokenizer | None = None
        self.token_bytes: torch.Tensor | None = None
        self.train_loader: BatchLoader | None = None
        self.val_loader: BatchLoader | None = None
        self.rank, self.world_size = rank, world_size
        self._train_start: dict | None = None  # loader state the current train dataloader began at
        self._consumed = 0  # training batches used since then
        self._stream_state: dict | None = None  # storage=stream: position after the last batch used

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Heavy one-off work on one process per node: tokenizer and, for shards, tokenization."""
        tokenizer = self.load_tokenizer()
        if self.hparams.storage == "shards":
            for split in ("train", "val"):
                if self.mixture is not None:
                    for i in range(len(self.mixture.specs)):
                        self.mixture.tokens(i, split, tokenizer)
                else:
                    self._token_source(split, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.train_loader is not None:
            return
        self.rank, self.world_size = self._resolve_rank()
        self.tokenizer = self.load_tokenizer()
        self.token_bytes = token_byte_lengths(self.tokenizer)
        hp = self.hparams
        if self.mixture is not None:
            self._setup_mixture()
            return
        if hp.storage == "stream":
            self.train_loader = StreamLoader(
                lambda: iter_documents(self.spec, "train"),
                self.tokenizer,
                seq_len=hp.seq_len,
                batch_size=hp.batch_size,
                seed=hp.seed,
                rank=self.rank,
                world_size=self.world_size,
                block_documents=hp.block_documents,
                token_bytes=self.token_bytes,
            )
        else:
            self.train_loader = BatchLoader(
                self._token_source("train", self.tokenizer),
                seq_len=hp.seq_len,
                batch_size=hp.batch_size,
                seed=hp.seed,
                shuffle=True,
                infinite=True,
                rank=self.rank,
                world_size=self.world_size,
                token_bytes=self.token_bytes,
            )
        self.val_loader = BatchLoader(
            self._token_source("val", self.tokenizer),
            seq_len=hp.seq_len,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            infinite=False,
            rank=self.rank,
            world_size=self.world_size,
            token_bytes=self.token_bytes,
            max_batches=hp.val_batches,
        )
        if self._train_start is not None and not self._streaming:
            self.train_loader.load_state_dict(self._train_start)  # validates a loaded state early

    @property
    def _streaming(self) -> bool:
        return self.hparams.storage == "stream"

    def train_dataloader(self) -> DataLoader:
        """Infinite stream from the current data position (use ``max_steps`` to stop)."""
        self._require_setup()
        if self._streaming:
            start = self._stream_start()
            self._stream_state = start
            return make_stream_dataloader(
                self.train_loader, start, num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory
            )
        self._train_start = self.state_dict()["train"]
        self._consumed = 0
        return make_dataloader(
            self.train_loader,
            self._train_start,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        """One deterministic pass over the validation windows of this rank."""
        self._require_setup()
        return make_dataloader(
            self.val_loader, None, num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count training batches as they are used (not as they are prefetched)."""
        if isinstance(batch, dict) and "state" in batch:  # stream batches carry their position
            batch = dict(batch)
            state = batch.pop("state")
            if self.trainer is None or self.trainer.training:
                self._stream_state = state
            return batch
        if self.trainer is None or self.trainer.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict:
        """``{"train": loader state}``: JSON-serialisable position after the batches used.

        With storage=stream every rank has its own position: ``{"train": {"kind": "stream", "ranks":
        [state of rank 0, ...]}}``, gathered from all ranks (Lightning calls this on every rank when it
        saves a checkpoint)."""
        if self._streaming:
            state = self._stream_state or (self._stream_start() if self._train_start else None)
            state = state or (self.train_loader.initial_state() if self.train_loader else None)
            if state is None:
                return {"train": self._train_start} if self._train_start is not None else {}
            ranks = [state]
            if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
                ranks = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(ranks, state)
            return {"train": {"kind": "stream", "ranks": ranks}}
        if self.train_loader is None:
            return {"train": self._train_start} if self._train_start is not None else {}
        return {"train": self.train_loader.state_after(self._consumed, self._train_start)}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict.get("train"):
            return
        if self._streaming:
            self._train_start, self._stream_state = dict(state_dict["train"]), None
            return
        self._train_start, self._consumed = dict(state_dict["train"]), 0
        if self.train_loader is not None:
            self.train_loader.load_state_dict(self._train_start)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer produces (unpadded); the model may pad with ``padded_vocab_size``."""
        self._require_setup()
        return self.tokenizer.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    @property
    def eos_id(self) -> int:
        self._require_setup()
        return self.tokenizer.eos_id

    # ------------------------------------------------------------------ helpers

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer of this data config: loaded, or trained once and cached (cheap on a cache hit)."""
        hp = self.hparams
        if hp.tokenizer != "bpe":
            return self._with_chat_tokens(Tokenizer.load(hp.tokenizer))
        mixture = self.mixture
        if self.is_chat:
            raise ConfigError(
                "data.format=chat needs the pretrained model's tokenizer: set train.init_from=RUN "
                "or tokenizer=file tokenizer.path=TOKENIZER.json"
            )
        return load_or_train_bpe(
            (lambda: mixture.documents("train")) if mixture else (lambda: iter_documents(self.spec, "train")),
            vocab_size=hp.vocab_size,
            cache_dir=hp.cache_dir,
            corpus_key=mixture.key() if mixture else corpus_key(self.spec),
            max_chars=hp.tokenizer_max_chars,
        )

    @property
    def is_chat(self) -> bool:
        """Conversations (data=chat, or a mixture with a chat-format source): chat tokens, masked loss."""
        if self.mixture is not None:
            return any(spec.format != "text" for spec in self.mixture.specs)
        return self.hparams.format != "text"

    def _with_chat_tokens(self, tokenizer: Tokenizer) -> Tokenizer:
        if not self.is_chat:
            return tokenizer
        from lrkv.data.chat import add_chat_tokens

        return add_chat_tokens(tokenizer)

    def metric_columns(self) -> list[str]:
        """Extra metrics.csv columns (data=mixture: tokens/<name>, val_loss/<name>, val_bpb/<name>)."""
        from lrkv.data.mixture import metric_columns

        return metric_columns(self.mixture.names) if self.mixture is not None else []

    def train_metrics(self) -> dict:
        """Per-log training metrics of the data (data=mixture: tokens drawn per source, all ranks)."""
        if self.mixture is None or self.train_loader is None:
            return {}
        state = self.state_dict()["train"]
        return {f"tokens/{k}": v for k, v in self.train_loader.tokens_by_source(state).items()}

    def _setup_mixture(self) -> None:
        hp = self.hparams
        common = dict(seq_len=hp.seq_len, rank=self.rank, world_size=self.world_size, token_bytes=self.token_bytes)
        self.train_loader = self.mixture.train_loader(self.tokenizer, batch_size=hp.batch_size, seed=hp.seed, **common)
        self.val_loader = self.mixture.val_loader(
            self.tokenizer, batch_size=hp.val_batch_size or hp.batch_size, max_batches=hp.val_batches, **common
        )
        if self._train_start is not None:
            self.train_loader.load_state_dict(self._train_start)

    def _token_source(self, split: str, tokenizer: Tokenizer):
        hp = self.hparams
        storage = "memory" if hp.storage == "stream" else hp.storage  # stream: validation is held in memory
        return split_tokens(
            self.spec,
            split,
            tokenizer,
            fmt=hp.format,
            storage=storage,
            max_tokens=hp.max_tokens,
            val_max_tokens=hp.val_max_tokens,
            cache_dir=hp.cache_dir,
            seed=hp.seed,
        )

    def _resolve_rank(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            if self.rank is None or self.world_size is None:
                raise ConfigError("set both data.rank and data.world_size, or neither")
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _stream_start(self) -> dict | None:
        """This rank's saved stream position (None: from the start)."""
        saved = self._train_start
        if not saved:
            return None
        if saved.get("kind") != "stream":
            raise DataError("the checkpoint's data state is not a stream position; resume with its data.storage")
        ranks = saved["ranks"]
        if len(ranks) != self.world_size:
            raise DataError(
                f"the checkpoint's stream positions are for {len(ranks)} process(es), this run has "
                f"{self.world_size}; resume data.storage=stream runs with the same number of processes"
            )
        return ranks[self.rank]

    def _require_setup(self) -> None:
        if self.train_loader is None:
            raise RuntimeError("call setup() before using the datamodule's data")
