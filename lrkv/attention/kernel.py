"""The inner attention call shared by all kinds: softmax(q k^T * scale + causal mask) v.

Layout is (batch, time, heads, dim) for q, k and v (flash-attn's layout). Keys/values may have fewer
heads than queries (GQA/MQA/MLA-absorbed); query head h uses key head h // (H / G). When the query is
shorter than the keys (chunked prefill or decoding with a cache) the queries are the *last* Tq
positions, so the causal mask is aligned bottom-right (SDPA's `is_causal` aligns it top-left, which is
wrong for caches).

Backend: flash-attn 2 when installed, on CUDA, in bf16/fp16 with equal q/v head dims <= 256;
otherwise torch's scaled_dot_product_attention (which itself picks flash/efficient/math kernels).
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
