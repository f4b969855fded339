"""Tokenizer: a thin wrapper around ``tokenizers.Tokenizer`` for byte-level BPE.

Two ways to get one, both offline:

- ``train_bpe(texts, vocab_size)`` trains a byte-level BPE (GPT-2 pre-tokenizer regex, 256 byte
  symbols in the initial alphabet, so every string round-trips); ``load_or_train_bpe`` caches the
  result on disk under a hash of (corpus key, vocab size, settings) so later runs reuse it.
- ``Tokenizer.load(path)`` reads a ``tokenizer.json`` (JSON only, never pickle), or a GPT-2 style
  ``vocab.json`` + ``merges.txt`` pair (e.g. the GPT-2 BPE, vocab 50257, padded to 50304).

``<|endoftext|>`` is the end-of-text token placed after every document. It is a special token:
``encode`` never produces it from text (a document containing the literal string gets ordinary
tokens for it), so ``eos_id`` appears only where the packer puts it and every other token's bytes
come from the text (see ``token_byte_lengths``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from lrkv.data.utils import atomic_write, chunked
from lrkv.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
_CACHE_VERSION = 1


class Tokenizer:
    """Text <-> token ids, with the end-of-text id and a stable content hash."""

    def __init__(self, backend: _Backend, eos_token: str = EOS_TOKEN):
        backend.encode_special_tokens = True  # text never turns into special tokens
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no {eos_token!r} token: add it as a special token or use a GPT-2 style BPE")
        backend.add_special_tokens([AddedToken(eos_token, special=True)])  # no-op if present
        self.backend = backend
        self.eos_token = eos_token
        self.eos_id: int = eos_id

    @functools.cached_property
    def vocab_size(self) -> int:
        """Size of the id space (largest id + 1), special tokens included; unpadded."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def is_byte_level(self) -> bool:
        """True when every token stands for a fixed byte string (exact byte counts)."""
        return isinstance(self.backend.decoder, decoders.ByteLevel)

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of the canonical tokenizer JSON: names the tokenizer in caches and shard indexes."""
        canonical = json.dumps(json.loads(self.backend.to_str()), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode``; special tokens are kept as their text."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str) -> str:
        """Write ``tokenizer.json`` atomically; ``path`` is the file or its directory."""
        if os.path.isdir(path) or not path.endswith(".json"):
            path = os.path.join(path, TOKENIZER_FILE)
        atomic_write(path, self.backend.to_str(pretty=True))
        return path

    def save_vocab_merges(self, directory: str) -> tuple[str, str]:
        """Write GPT-2 style ``vocab.json`` and ``merges.txt`` (BPE model only)."""
        os.makedirs(directory, exist_ok=True)
        vocab, merges = self.backend.model.save(directory)
        return vocab, merges

    @classmethod
    def load(cls, path: str, eos_token: str = EOS_TOKEN) -> Tokenizer:
        """Load ``tokenizer.json`` (a file, or a directory holding it), or a directory holding a
        GPT-2 style ``vocab.json`` + ``merges.txt``."""
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
                path = os.path.join(path, TOKENIZER_FILE)
            elif all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
                return cls.from_gpt2_files(
                    os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), eos_token
                )
            else:
                raise DataError(
                    f"no tokenizer.json or vocab.json+merges.txt in {path!r}: "
                    "point tokenizer.path at a tokenizer directory or file"
                )
        if not os.path.isfile(path):
            raise DataError(
                f"tokenizer file {path!r} does not exist: fix tokenizer.path, or train one with tokenizer=bpe"
            )
        try:
            backend = _Backend.from_file(path)
        except Exception as e:  # the Rust parser raises plain Exception
            raise DataError(f"cannot parse tokenizer {path!r}: {e}; expected a tokenizer.json") from e
        return cls(backend, eos_token)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str, merges_path: str, eos_token: str = EOS_TOKEN) -> Tokenizer:
        """Byte-level BPE from GPT-2 style files (vocab.json: token -> id; merges.txt)."""
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise DataError(f"tokenizer file {p!r} does not exist: fix tokenizer.path")
        backend = _Backend(models.BPE.from_file(vocab_path, merges_path))
        _make_byte_level(backend)
        return cls(backend, eos_token)


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, max_chars: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (256 bytes + ``<|endoftext|>`` + merges).

    ``max_chars`` stops reading texts once that many characters were seen (whole documents).
    Deterministic for a given text stream.
    """
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size} is too small for byte-level BPE: use >= 257")
    backend = _Backend(models.BPE())
    _make_byte_level(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_limit_chars(texts, max_chars), trainer)
    return Tokenizer(backend)


def bpe_cache_path(
    cache_dir: str, *, vocab_size: int, corpus_key: dict, min_frequency: int = 2, max_chars: int | None = None
) -> str:
    """Where ``load_or_train_bpe`` keeps the tokenizer for these settings."""
    key = {
        "kind": "byte-level-bpe",
        "version": _CACHE_VERSION,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "max_chars": max_chars,
        "corpus": corpus_key,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "tokenizers", f"bpe{vocab_size}-{digest}", TOKENIZER_FILE)


def load_or_train_bpe(
    texts: Callable[[], Iterable[str]],
    *,
    vocab_size: int,
    cache_dir: str,
    corpus_key: dict,
    min_frequency: int = 2,
    max_chars: int | None = None,
) -> Tokenizer:
    """The cached BPE for these settings, training it (from ``texts()``) only when missing.

    ``texts`` is a zero-argument callable so that a cache hit reads no corpus at all.
    """
    path = bpe_cache_path(
        cache_dir, vocab_size=vocab_size, corpus_key=corpus_key, min_frequency=min_frequency, max_chars=max_chars
    )
    if os.path.isfile(path):
        return Tokenizer.load(path)
    tokenizer = train_bpe(texts(), vocab_size, min_frequency=min_frequency, max_chars=max_chars)
    tokenizer.save(path)
    atomic_write(
        os.path.join(os.path.dirname(path), "key.json"),
        json.dumps({"vocab_size": vocab_size, "corpus": corpus_key}, indent=1),
    )
    return tokenizer


def encode_documents(
    tokenizer: Tokenizer, texts: Iterable[str], *, max_tokens: int | None = None, chunk: int = 512
) -> Iterator[list[int]]:
    """Token ids of each text (no EOS), encoded ``chunk`` texts at a time; stops after the document
    that brings the total, counting one EOS per document, to ``max_tokens``."""
    total = 0
    for batch in chunked(texts, chunk):
        for ids in tokenizer.encode_batch(batch):
            yield ids
            total += len(ids) + 1
            if max_tokens is not None and total >= max_tokens:
                return


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """Round a vocabulary size up to a multiple (GPT-2: 50257 -> 50304) for faster matmuls."""
    return -(-n // multiple) * multiple


def token_byte_lengths(tokenizer: Tokenizer) -> torch.LongTensor:
    """UTF-8 byte length of each token id after decoding (LongTensor of length ``vocab_size``).

    Exact for byte-level BPE: every token stands for a fixed byte string, so the bytes of a token
    sequence sum to the byte length of the text it encodes. Special tokens and unused ids count 0.
    For other tokenizers it falls back to decoding each id alone (approximate).
    """
    backend = tokenizer.backend
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for token, tid in backend.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if tokenizer.is_byte_level and all(ch in byte_of for ch in token):
            lengths[tid] = len(token)
        else:
            lengths[tid] = len(backend.decode([tid]).encode("utf-8"))
    return lengths


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _make_byte_level(backend: _Backend) -> None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()


def _limit_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        if max_chars is not None and seen >= max_chars:
            return
        seen += len(text)
        yield text
