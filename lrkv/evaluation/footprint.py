"""KV-cache footprint of model presets, measured from a real cache (no weights needed).

For every preset the model is built on the meta device (shapes only, no memory), a cache for
`batch_size` sequences of `context` tokens is allocated on the meta device and filled by a real
prefill, and the bytes of the cache tensors are summed (`lrkv.measure.kv_cache_bytes`, the one
measurement that training and compression use too). The result must equal the analytic formula of
the attention kind (`ModelConfig.kv_cache_bytes_per_token`, docs/design-notes.md §2); a mismatch
raises, so a table that prints is a checked table.

Columns: parameters (total, non-embedding), KV bytes per token (all layers), KV MiB at
(context, batch), and the ratio to MHA of the same shape (2·H·d_h per token per layer).

KV capacity (`memory_gib=80`, docs/design-notes.md §15): beside bf16 weights (2·N bytes) a device of M bytes
holds (M − 2·N) / (KV bytes per token) cached tokens, i.e. batch × context; `max_batch` is that at the
given context. A bandwidth-bound decode step reads the weights and the cache once:
t = (2·N + batch · context · KV bytes per token) / bandwidth (`hbm_tb_s`, default 3.35 TB/s, an H100
SXM), so the ideal decode speed is batch / t tokens/s, shown at the given (context, batch).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrkv.config import ModelConfig, list_presets, load_model_config
from lrkv.errors import ConfigError
from lrkv.evaluation.report import markdown_table, text_table, write_csv
from lrkv.io.load import parse_dtype
from lrkv.measure import kv_cache_bytes

COLUMNS = (
    "model",
    "attention",
    "params",
    "non_embedding_params",
    "kv_bytes_per_token",
    "analytic_bytes_per_token",
    "kv_mib",
    "ratio_to_mha",
    "context",
    "batch_size",
    "dtype",
)
FORMATS = {
    "kv_mib": ".1f",
    "ratio_to_mha": ".3f",
    "max_cached_tokens": ",",
    "max_batch": ",",
    "ideal_decode_tok_s": ",.0f",
    "params": ",",
    "non_embedding_params": ",",
    "kv_bytes_per_token": ",",
    "analytic_bytes_per_token": ",",
}
HEADERS = {
    "non_embedding_params": "non-emb params",
    "kv_bytes_per_token": "KV B/token",
    "analytic_bytes_per_token": "analytic B/token",
    "kv_mib": "KV MiB",
    "ratio_to_mha": "vs MHA",
    "batch_size": "batch",
    "max_cached_tokens": "max batch×context",
    "max_batch": "max batch",
    "ideal_decode_tok_s": "ideal decode tok/s",
}
CAPACITY = ("max_cached_tokens", "max_batch", "ideal_decode_tok_s")


# ---- KV capacity and the bandwidth-bound decode ideal (pure functions) ----------------------------------
def kv_capacity_tokens(memory_bytes: float, weight_bytes: float, kv_bytes_per_token: float) -> int:
    """Cached tokens (batch × context, all sequences) that fit beside the weights; 0 when the weights alone do not."""
    return max(0, int((memory_bytes - weight_bytes) // kv_bytes_per_token))


def ideal_decode_step_s(
    weight_bytes: float, batch: int, context: int, kv_bytes_per_token: float, bandwidth_bytes_s: float
) -> float:
    """Seconds of one bandwidth-bound decode step: weights read once plus every sequence's cache read once."""
    return (weight_bytes + batch * context * kv_bytes_per_token) / bandwidth_bytes_s


def ideal_decode_tokens_per_s(
    weight_bytes: float, batch: int, context: int, kv_bytes_per_token: float, bandwidth_bytes_s: float
) -> float:
    """Generated tokens per second (all sequences) of a bandwidth-bound decode step."""
    return batch / ideal_decode_step_s(weight_bytes, batch, context, kv_bytes_per_token, bandwidth_bytes_s)


def capacity_columns(
    params: int, kv_bytes_per_token: int, context: int, batch_size: int, memory_gib: float, hbm_tb_s: float
) -> dict:
    """The capacity columns of one footprint row for bf16 weights (2 bytes per parameter)."""
    weights = 2 * params
    tokens = kv_capacity_tokens(memory_gib * 2**30, weights, kv_bytes_per_token)
    return {
        "memory_gib": memory_gib,
        "max_cached_tokens": tokens,
        "max_batch": tokens // context,
        "ideal_decode_tok_s": ideal_decode_tokens_per_s(
            weights, batch_size, context, kv_bytes_per_token, hbm_tb_s * 1e12
        ),
        "hbm_tb_s": hbm_tb_s,
    }


def resolve_model_config(spec: str | ModelConfig) -> ModelConfig:
    """A preset name (`lrkv_1b`), a pretrained/run folder (reads its model_config.json), or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    path = Path(str(spec)).expanduser()
    if path.exists():
        from lrkv.io import find_pretrained_folder, read_model_config

        folder = find_pretrained_folder(path)
        if folder is None:
            raise ConfigError(
                f"{path} has no model_config.json (nor pretrained/); pass a preset name or a pretrained folder"
            )
        return read_model_config(folder)
    return load_model_config(str(spec))


def mha_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Analytic MHA cache of the same shape: 2·H·d_h elements per token per layer."""
    return 2 * cfg.n_head * cfg.head_dim * cfg.n_layer * torch.empty((), dtype=dtype).element_size()


def measure(cfg: ModelConfig, context: int, batch_size: int, dtype: torch.dtype) -> dict:
    """Build on meta, prefill a real cache of `context` tokens (at most max_seq_len), count its bytes
    (`lrkv.measure.kv_cache_bytes`, which checks them against the analytic formula)."""
    kv = kv_cache_bytes(cfg, dtype, context=context, batch_size=batch_size)
    model, per_token, total = kv.model, kv.per_token, kv.allocated
    return {
        "model": cfg.name,
        "attention": cfg.attention,
        "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "kv_bytes_per_token": int(per_token),
        "analytic_bytes_per_token": int(cfg.kv_cache_bytes_per_token(dtype)),
        "kv_mib": total / 2**20,
        "ratio_to_mha": per_token / mha_bytes_per_token(cfg, dtype),
        "context": context,
        "batch_size": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def footprint_table(
    models,
    context: int = 2048,
    batch_size: int = 1,
    dtype: str | torch.dtype = "bfloat16",
    memory_gib: float | None = None,
    hbm_tb_s: float = 3.35,
) -> list[dict]:
    if not models:
        raise ConfigError(f"no models given: pass models=[mha_1b,lrkv_1b,...]; presets: {', '.join(list_presets())}")
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"context must be a positive integer, got {context!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value in (("memory_gib", memory_gib), ("hbm_tb_s", hbm_tb_s)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ConfigError(f"{name} must be a positive number of {name.split('_', 1)[1]}, got {value!r}")
    dtype = parse_dtype(dtype, torch.bfloat16)
    rows = [measure(resolve_model_config(m), context, batch_size, dtype) for m in models]
    if memory_gib is not None:
        for row in rows:
            row.update(
                capacity_columns(row["params"], row["kv_bytes_per_token"], context, batch_size, memory_gib, hbm_tb_s)
            )
    return rows


def report_footprint(rows: list[dict], out_dir: str | Path | None = None) -> str:
    """Print-ready table; writes footprint.csv and footprint.md into out_dir."""
    columns = [c for c in COLUMNS if c not in ("analytic_bytes_per_token", "context", "batch_size", "dtype")]
    capacity = bool(rows) and "max_batch" in rows[0]
    if capacity:
        columns += list(CAPACITY)
    text = text_table(rows, columns, FORMATS, HEADERS)
    if capacity:
        r = rows[0]
        text += (
            f"\ncapacity beside bf16 weights in {r['memory_gib']} GiB; ideal decode tok/s at batch {r['batch_size']}, "
            f"context {r['context']}, {r['hbm_tb_s']} TB/s (weights + cache read once per step)"
        )
    if rows:
        r = rows[0]
        text = (
            f"KV cache at context {r['context']}, batch {r['batch_size']}, {r['dtype']} "
            "(measured on meta-device caches == analytic)\n" + text
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        all_columns = COLUMNS + (CAPACITY + ("memory_gib", "hbm_tb_s") if capacity else ())
        write_csv(out_dir / "footprint.csv", rows, all_columns)
        (out_dir / "footprint.md").write_text(markdown_table(rows, all_columns, FORMATS, HEADERS) + "\n")
    return text
