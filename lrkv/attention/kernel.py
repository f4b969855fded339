"""The inner attention call shared by all kinds: softmax(q k^T * scale + causal mask) v.

Layout is (batch, time, heads, dim) for q, k and v (flash-attn's layout). Keys/values may have fewer
heads than queries (GQA/MQA/MLA-absorbed); query head h uses key head h // (H / G). When the query is
shorter than the keys (chunked prefill or decoding with a cache) the queries are the *last* Tq
positions, so the causal mask is aligned bottom-right (SDPA's `is_causal` aligns it top-left, which is
wrong for caches).

Backend: flash-attn 2 when installed, on CUDA, in bf16/fp16 with equal q/v head dims <= 256; for a
few queries over a longer cache with shared K/V heads (GQA/MQA/MLA decoding) `grouped_decode`, which
attends each group's query heads to their K/V head with one GEMM and never expands the heads (SDPA's
`enable_gqa` copies them on CPU, reading as much as MHA); otherwise torch's scaled_dot_product_attention
(which itself picks flash/efficient/math kernels).
"""

import torch
import torch.nn.functional as F

try:  # optional extra: pip install -e ".[flash]"
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


def flash_usable(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] == v.shape[-1] <= 256
    )


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Boolean (tq, tk) mask, True = attend: query i sits at position tk - tq + i."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def uses_grouped_decode(q: torch.Tensor, k: torch.Tensor, max_queries: int = 16) -> bool:
    """Decoding (a few queries over a longer cache) with fewer K/V heads than query heads."""
    return q.shape[1] <= max_queries and q.shape[1] < k.shape[1] and k.shape[2] < q.shape[2]


def grouped_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention without K/V expansion. q (B, Tq, H, D), k (B, Tk, G, D), v (B, Tk, G, Dv) -> (B, Tq, H, Dv).

    The H/G query heads of group g and their Tq positions become the rows of one query matrix, so that
    attention runs as (B, G, H/G·Tq, D) queries against (B, G, Tk, D) keys: one attention call in which
    every K/V head is read once (SDPA's kernels stream it); the causal mask is aligned bottom-right and
    repeated for each head of a group. Caches stored head-major (gqa.py) make each group's keys
    contiguous rows.
    """
    b, tq, h, d = q.shape
    tk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    n = h // g
    qg = q.transpose(1, 2).reshape(b, g, n * tq, d)  # head h = g n + j; rows (j, t)
    mask = causal_mask(tq, tk, q.device).repeat(n, 1) if tq > 1 else None
    y = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return y.reshape(b, h, tq, dv).transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention. q (B, Tq, H, D), k (B, Tk, G, D), v (B, Tk, G, Dv) -> (B, Tq, H, Dv)."""
    if backend != "sdpa" and flash_usable(q, v):
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)  # bottom-right aligned
    if backend == "flash" and flash_attn_func is None:
        raise RuntimeError("attn_backend=flash but flash-attn is not installed; pip install flash-attn or use sdpa")
    if uses_grouped_decode(q, k):
        return grouped_decode(q, k, v, scale)
    tq, tk = q.shape[1], k.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    if tq == tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif tq == 1:  # one new token sees every cached position
        y = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_mask(tq, tk, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)
