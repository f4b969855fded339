"""Measurements that training and evaluation must make the same way (one definition each).

Held-out loss of a batch, as sums that add up over batches and data-parallel ranks:

    nats   = Σ -log p(target)          over targets >= 0 (float64)
    tokens = number of targets >= 0
    bytes  = UTF-8 bytes those targets stand for: the batch's per-row "bytes" from the data loader
             when every target is scored, else Σ token_bytes[target]; 0 when neither is known

    loss = nats / tokens,   bpb = nats / (ln 2 · bytes)

Training's validation (lrkv/training/module.py) and `python evaluate.py mode=loss` both use
`loss_sums`, so a checkpoint evaluated again reproduces the validation loss its run logged.

KV-cache bytes per token, measured from a real cache: the model is built on the meta device (shapes
only, no memory), a cache is allocated and filled by a real prefill, and its tensors' bytes are
summed (`KVCache.nbytes`). The result must equal the kind's analytic formula
(`ModelConfig.kv_cache_bytes_per_token`, docs/design-notes.md §2); a mismatch raises, so every
number printed (training summary, footprint table, compressed models) is a checked one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrkv.config import ModelConfig
from lrkv.model import Transformer


def loss_sums(model, batch: dict, token_bytes: torch.Tensor | None = None) -> torch.Tensor:
    """float64 tensor [nats, tokens, bytes] of one batch {"input", "target"[, "bytes"]} (see the module docstring)."""
    inputs, targets = batch["input"], batch["target"]
    logits = model(inputs)
    flat = targets.flatten()
    nll = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=-1, reduction="none")
    valid = flat >= 0
    nats = nll[valid].double().sum()
    tokens = valid.sum().double()
    if "bytes" in batch and bool(valid.all()):
        nbytes = batch["bytes"].to(nats.device).sum().double()
    elif token_bytes is not None:
        nbytes = token_bytes.to(flat.device)[flat[valid]].sum().double()
    else:
        nbytes = torch.zeros((), dtype=torch.float64, device=nats.device)
    return torch.stack([nats, tokens, nbytes])


@dataclass
class KVBytes:
    per_token: int  # bytes per cached token per sequence, all layers (measured == analytic)
    allocated: int  # bytes of the whole cache: context x batch_size tokens
    model: Transformer  # the meta-device model it was measured on (parameter counts)


@torch.no_grad()
def kv_cache_bytes(
    cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, context: int = 4, batch_size: int = 1
) -> KVBytes:
    """Build on meta, prefill a real cache of `context` tokens (at most max_seq_len), count its bytes."""
    with torch.device("meta"):
        model = Transformer(cfg)
    cache = model.new_cache(batch_size, max_len=context, dtype=dtype, device="meta")
    prefill = min(context, cfg.max_seq_len)
    model(torch.zeros(batch_size, prefill, dtype=torch.long, device="meta"), cache)
    per_token = cache.nbytes_per_token()
    analytic = cfg.kv_cache_bytes_per_token(dtype)
    if per_token != analytic:
        raise AssertionError(
            f"{cfg.name}: measured KV cache {per_token} B/token != analytic {analytic} B/token; "
            "the attention kind's cache_elements_per_token disagrees with its new_cache"
        )
    allocated = cache.nbytes(filled_only=False)  # allocated for the whole context (all positions, all rows)
    if allocated != analytic * context * batch_size:
        raise AssertionError(
            f"{cfg.name}: allocated cache {allocated} B != {analytic} B/token x {context} x {batch_size}"
        )
    return KVBytes(int(per_token), int(allocated), model)
