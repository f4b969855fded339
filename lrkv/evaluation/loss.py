"""Held-out loss: cross-entropy, perplexity and bits-per-byte.

    loss = N / n            N = sum over target tokens of -log p(target) (nats), n = number of targets
    ppl  = exp(loss)
    bpb  = N / (ln 2 * B)   B = UTF-8 bytes of the text those targets stand for

Bytes come from the tokenizer's byte-length table (`lrkv.data.token_byte_lengths`): with a
byte-level BPE every token is a fixed byte string, so B is exactly the byte length of the original
text and bits-per-byte compares models with different tokenizers. End-of-text tokens (between
packed documents) are scored like any target and count 0 bytes; this is the same convention as
the training loop's `val_bpb` (both sum with `lrkv.measure.loss_sums`), so the two agree.

The data are the packed windows of the data pipeline: the run's own data config (from its
`.hydra/config.yaml`) with any overrides, validation split by default, so the result is the
run's validation loss measured again on the finished model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from lrkv.errors import ConfigError
from lrkv.measure import loss_sums

CORPUS_FIELDS = (
    "source",
    "name",
    "split",
    "val_split",
    "val_fraction",
    "split_seed",
    "text_field",
    "txt_unit",
    "streaming",
    "max_documents",
)


@dataclass
class LossResult:
    loss: float  # mean cross-entropy per target token, nats
    ppl: float
    bpb: float | None  # None when the targets cover no bytes
    tokens: int  # target tokens scored
    bytes: int  # UTF-8 bytes those targets stand for
    nats: float  # total cross-entropy, nats
    batches: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sums(cls, nats: float, tokens: int, nbytes: int, batches: int, seconds: float) -> LossResult:
        """loss, ppl and bpb from summed nats, targets and bytes (see the module docstring)."""
        if tokens == 0:
            raise ConfigError("no target tokens to evaluate: the data gave no full window (lower seq_len or add data)")
        loss = nats / tokens
        return cls(
            loss=loss,
            ppl=math.exp(min(loss, 700.0)),
            bpb=nats / (math.log(2) * nbytes) if nbytes else None,
            tokens=int(tokens),
            bytes=int(nbytes),
            nats=nats,
            batches=int(batches),
            seconds=seconds,
        )

    @classmethod
    def combine(cls, results: list[LossResult]) -> LossResult:
        """One result over several (token-weighted: the sums add up)."""
        return cls.from_sums(
            *(sum(getattr(r, f) for r in results) for f in ("nats", "tokens", "bytes", "batches", "seconds"))
        )


@torch.no_grad()
def evaluate_batches(
    model, batches: Iterable[dict], token_bytes: torch.Tensor | None = None, device: str | torch.device | None = None
) -> LossResult:
    """Sum cross-entropy (float64), targets and bytes over batches {"input", "target"[, "bytes"]}.

    The sums are `lrkv.measure.loss_sums`, the same as training's validation: targets < 0 are ignored;
    bytes come from the batch's "bytes" when present (rows' totals from the data loader), else from
    `token_bytes[target]`.
    """
    device = device or next(model.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)
    n_batches = 0
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        total += loss_sums(model, batch, token_bytes)
        n_batches += 1
    nats, tokens, nbytes = total.tolist()
    return LossResult.from_sums(nats, int(tokens), int(nbytes), n_batches, time.perf_counter() - start)


# ---- data ----------------------------------------------------------------------------------------
def flatten_data_config(data_cfg: dict | None) -> dict:
    """The data config's leaves, one level of nesting flattened (e.g. data.corpus.source -> source).

    Keys at the top level win over nested ones; `_target_` and the like are dropped.
    """
    flat: dict = {}
    for value in (data_cfg or {}).values():
        if isinstance(value, dict):
            for sub, v in value.items():
                if not isinstance(v, dict):
                    flat.setdefault(sub, v)
    for key, value in (data_cfg or {}).items():
        if not isinstance(value, dict) and not str(key).startswith("_"):
            flat[key] = value
    return flat


def heldout_batches(
    data_cfg: dict | None,
    tokenizer,
    *,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    default_seq_len: int = 256,
):
    """Packed windows of one split ("val" or "train"), in a fixed order, as the training validation
    loader makes them (one rank), tokenized with the model's own tokenizer.

    Returns (BatchLoader, settings dict). `data_cfg` keys (flattened, see `flatten_data_config`): the
    CorpusSpec fields (source, val_fraction, split_seed, ...), seq_len, batch_size/val_batch_size,
    val_batches, max_tokens/val_max_tokens. Explicit arguments override them.
    """
    from lrkv.data import BatchLoader, CorpusSpec, token_byte_lengths
    from lrkv.data.tokens import split_tokens

    if split not in ("val", "train"):
        raise ConfigError(f"loss.split={split!r} is unknown; use val or train")
    flat = flatten_data_config(data_cfg)
    spec_args = {k: flat[k] for k in CORPUS_FIELDS if flat.get(k) is not None}
    spec_args.setdefault("source", "embedded")
    try:
        spec = CorpusSpec(**spec_args)
    except TypeError as e:
        raise ConfigError(f"data config does not fit CorpusSpec: {e}") from None
    seq_len = int(seq_len or flat.get("seq_len") or default_seq_len)
    if split == "val":
        batch_size = batch_size or flat.get("val_batch_size") or flat.get("batch_size") or 8
        max_batches = max_batches if max_batches is not None else flat.get("val_batches")
        max_tokens = max_tokens if max_tokens is not None else flat.get("val_max_tokens")
    else:
        batch_size = batch_size or flat.get("batch_size") or 8
        max_tokens = max_tokens if max_tokens is not None else flat.get("max_tokens")
    token_bytes = token_byte_lengths(tokenizer)
    fmt = flat.get("format") or "text"  # chat runs (data=chat): assistant tokens only, as their validation
    source = split_tokens(
        spec, split, tokenizer, fmt=fmt, max_tokens=max_tokens, val_max_tokens=max_tokens, shuffle=False
    )
    loader = BatchLoader(
        source,
        seq_len=seq_len,
        batch_size=int(batch_size),
        shuffle=False,
        infinite=False,
        token_bytes=token_bytes,
        max_batches=max_batches,
    )
    settings = {
        "source": spec.source,
        "format": fmt,
        "split": split,
        "seq_len": seq_len,
        "batch_size": int(batch_size),
        "max_batches": max_batches,
        "max_tokens": max_tokens,
        "val_fraction": spec.val_fraction,
        "split_seed": spec.split_seed,
        "stream_tokens": source.num_tokens(),
        "windows": loader.epoch_windows(0),
    }
    return loader, settings


def evaluate_checkpoint_loss(
    pretrained,
    data_cfg: dict | None,
    *,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Loss, perplexity and bits-per-byte of a loaded checkpoint on a held-out split. Returns a flat dict."""
    from lrkv.data import token_byte_lengths
    from lrkv.io import require_tokenizer

    tokenizer = require_tokenizer(pretrained, "bits-per-byte")
    model = pretrained.model
    seq_len = seq_len or flatten_data_config(data_cfg).get("seq_len") or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"seq_len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}; lower loss.seq_len"
        )
    if _mixture_sources(data_cfg) is not None:
        return mixture_loss(
            model, tokenizer, data_cfg, split=split, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches
        )
    loader, settings = heldout_batches(
        data_cfg,
        tokenizer,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=max_batches,
        max_tokens=max_tokens,
        default_seq_len=model.cfg.max_seq_len,
    )
    result = evaluate_batches(model, loader, token_byte_lengths(tokenizer))
    return {**settings, **result.to_dict(), "tokens_per_s": result.tokens / max(result.seconds, 1e-9)}


# ---- mixtures ------------------------------------------------------------------------------------
def _mixture_sources(data_cfg: dict | None):
    flat = flatten_data_config(data_cfg)
    if flat.get("source") == "mixture" or flat.get("sources"):
        return flat.get("sources")
    return None


def mixture_loss(model, tokenizer, data_cfg: dict, *, split="val", seq_len=None, batch_size=None, max_batches=None):
    """Held-out loss of a mixture run (data=mixture, lrkv/data/mixture.py): every source's validation
    windows, as training validates them, scored per source (`val_loss/<name>`, `val_bpb/<name>`) and
    together (token-weighted over all sources: the run's `val_loss`)."""
    from lrkv.data import token_byte_lengths
    from lrkv.data.mixture import Mixture

    if split != "val":
        raise ConfigError("a mixture run is scored on its sources' validation splits: use loss.split=val")
    flat = flatten_data_config(data_cfg)
    mixture = Mixture(
        flat["sources"],
        val_fraction=flat.get("val_fraction", 0.05),
        split_seed=flat.get("split_seed", 0),
        storage="shards" if flat.get("storage") == "shards" else "memory",  # mixtures are never streamed
        cache_dir=flat.get("cache_dir") or ".cache/lrkv",
    )
    seq_len = int(seq_len or flat.get("seq_len") or model.cfg.max_seq_len)
    batch_size = int(batch_size or flat.get("val_batch_size") or flat.get("batch_size") or 8)
    max_batches = max_batches if max_batches is not None else flat.get("val_batches")
    token_bytes = token_byte_lengths(tokenizer)
    loaders = mixture.val_loader(
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        token_bytes=token_bytes,
        max_batches=max_batches,
    ).loaders
    out: dict = {"source": "mixture", "sources": mixture.names, "split": split, "seq_len": seq_len}
    out.update(batch_size=batch_size, max_batches=max_batches)
    results = []
    for name, loader in zip(mixture.names, loaders):
        result = evaluate_batches(model, loader, token_bytes)
        out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = result.loss, result.bpb
        out[f"tokens/{name}"] = result.tokens
        results.append(result)
    total = LossResult.combine(results)
    return {**out, **total.to_dict(), "tokens_per_s": total.tokens / max(total.seconds, 1e-9)}
