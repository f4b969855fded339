"""Calibration data for post-training KV compression: token sequences and per-layer block inputs.

`calibrate(model, batches, max_tokens)` keeps at most `max_tokens` tokens (whole rows of the
(B, T) batches) and `Calibration.layers()` streams, layer by layer, the input X_l (N, T, d) of each
decoder block of the *original* model together with its output Y_l = block_l(X_l) = X_{l+1}. Only
one layer's inputs and outputs are held at a time (2 N T d numbers), whatever the depth.

Every layer is calibrated on the original model's activations (EigenAttention does the same): the
bases of layer l do not depend on how earlier layers were compressed.

`calibration_batches(tokenizer, source=...)` builds token batches from the data pipeline: the
embedded corpus (default, offline), a local text/jsonl/parquet file or folder (e.g. a WikiText-2
file such as `wiki.train.raw` when you have one: it is not shipped and not downloaded here), or a
hub dataset when online.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from lrkv.errors import ConfigError, DataError


class Calibration:
    """Calibration token sequences (N, T) for one model; streams per-layer block inputs/outputs."""

    def __init__(self, model, tokens: torch.Tensor, chunk_rows: int = 8):
        self.model, self.tokens, self.chunk_rows = model, tokens, chunk_rows

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @torch.no_grad()
    def layers(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (l, X_l, Y_l) for every block l: its input and output on all calibration tokens."""
        model = self.model
        device = model.embed.weight.device
        x = torch.cat([model.embed_norm(model.embed(rows.to(device))) for rows in self.tokens.split(self.chunk_rows)])
        for layer, block in enumerate(model.blocks):
            y = torch.cat([block(rows) for rows in x.split(self.chunk_rows)])
            yield layer, x, y
            x = y


def calibrate(model, batches: Iterable, max_tokens: int = 128 * 2048, chunk_rows: int = 8) -> Calibration:
    """Collect whole rows of token batches (LongTensor (B, T), or dicts with "input") up to max_tokens.

    All rows must have the same length T <= model.cfg.max_seq_len; N = min(rows given, max_tokens // T).
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"compress.max_tokens must be a positive integer, got {max_tokens!r}")
    rows, total = [], 0
    for batch in batches:
        tokens = batch["input"] if isinstance(batch, dict) else batch
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise DataError(
                f"calibration batches must be integer token tensors (B, T), got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if rows and tokens.shape[1] != rows[0].shape[1]:
            raise DataError(
                f"calibration rows differ in length ({rows[0].shape[1]} vs {tokens.shape[1]}); use one seq_len"
            )
        take = min(tokens.shape[0], (max_tokens - total) // tokens.shape[1])
        if take > 0:
            rows.append(tokens[:take].long())
            total += take * tokens.shape[1]
        if take < tokens.shape[0]:
            break
    if not rows:
        raise DataError(
            f"no calibration sequence fits in max_tokens={max_tokens}; give batches or raise compress.max_tokens"
        )
    tokens = torch.cat(rows)
    cfg = model.cfg
    if tokens.shape[1] > cfg.max_seq_len:
        raise DataError(
            f"calibration seq_len {tokens.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}; "
            "lower compress.calib.seq_len"
        )
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise DataError(
            f"calibration token ids fall outside the model vocabulary ({cfg.vocab_size}); use the model's tokenizer"
        )
    return Calibration(model, tokens, chunk_rows)


def calibration_batches(
    tokenizer,
    source: str = "embedded",
    n_seqs: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    split: str = "train",
    txt_unit: str = "paragraph",
    text_field: str = "text",
) -> list[torch.Tensor]:
    """n_seqs token rows of seq_len from a corpus (documents packed with EOS), in batches of batch_size.

    source: "embedded[:topics|:docstrings]" (offline default), a local file/folder/glob (e.g. a
    WikiText-2 `wiki.train.raw`), or "hf:owner/name". See lrkv.data.corpus for the split rule.
    """
    from lrkv.data import CorpusSpec, encode_documents, iter_documents, pack_documents

    for name, value in (("n_seqs", n_seqs), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"compress.calib.{name} must be a positive integer, got {value!r}")
    need = n_seqs * seq_len
    spec = CorpusSpec(source=source, txt_unit=txt_unit, text_field=text_field)
    docs = encode_documents(tokenizer, iter_documents(spec, split), max_tokens=need)
    stream = pack_documents(docs, tokenizer.eos_id, np.int64)
    if len(stream) < need:
        raise DataError(
            f"calibration source {source!r} ({split}) has {len(stream)} tokens, fewer than "
            f"n_seqs x seq_len = {need}; lower compress.calib.n_seqs or seq_len, or use a larger source"
        )
    rows = torch.from_numpy(stream[:need].copy()).view(n_seqs, seq_len)
    return list(rows.split(batch_size))
