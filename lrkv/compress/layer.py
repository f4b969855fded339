"""One decoder block of a full-attention model with projected keys and values (docs/design-notes.md §6).

For a block with GQA attention (MHA: G = H), orthonormal bases P_K (d_h x r) shared by the G
key/value heads and P_V (G x d_h x r), one per head:

    k_g <- (k_g P_K) P_K^T          k_g = norm(x W_K,g), the pre-RoPE key (after QK-norm)
    v_g <- (v_g P_V,g) P_V,g^T

and everything else as in the source block. This "projected" block is what the compressed model
computes (lrkv/attention/compressed.py folds it into a smaller cache); it is differentiable in the
bases, so StiefAttention trains them through it.

Errors are measured on the whole decoder block output Y = block(X) (residual included):
relative Frobenius error ||Y' - Y||_F / ||Y||_F and mean token cosine similarity cos(y'_t, y_t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrkv.attention.kernel import attend
from lrkv.errors import ConfigError
from lrkv.rope import apply_rope

SOURCE_KINDS = ("mha", "gqa", "mqa")


def check_source(model) -> None:
    """ConfigError (one line) unless the model has full attention (MHA/GQA/MQA) to compress."""
    kind = model.cfg.attention
    if kind not in SOURCE_KINDS:
        raise ConfigError(
            f"post-training KV compression needs a full-attention model (mha, gqa or mqa), got attention={kind!r}; "
            "LRKV/MLA models already have compact caches: evaluate them as trained"
        )


def project_keys(k: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """(k P_K) P_K^T for k (..., d_h) and P_K (d_h, r)."""
    return (k @ pk) @ pk.T


def project_values(v: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """(v_g P_V,g) P_V,g^T per head for v (B, T, G, d_h) and P_V (G, d_h, r)."""
    return torch.einsum("btgr,ger->btge", torch.einsum("btgd,gdr->btgr", v, pv), pv)


def keys_values(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys norm(a W_K) and values a W_V, each (B, T, G, d_h), with a = attn_norm(x)."""
    k, v = block.attn.keys_values(block.attn_norm(x))
    return block.attn.k_norm(k), v


def projected_block(block, x: torch.Tensor, pk: torch.Tensor | None = None, pv: torch.Tensor | None = None):
    """block(x) of a GQA block with keys/values projected onto the bases (None: not projected).

    Sequences start at position 0. With pk = pv = None this equals block(x).
    """
    attn = block.attn
    b, t, _ = x.shape
    q, (cos, sin) = attn.project_queries(block.attn_norm(x), torch.arange(t, device=x.device))
    k, v = keys_values(block, x)
    if pk is not None:
        k = project_keys(k, pk.to(device=k.device, dtype=k.dtype))
    if pv is not None:
        v = project_values(v, pv.to(device=v.device, dtype=v.dtype))
    y = attend(q, apply_rope(k, cos, sin), v, backend=attn.cfg.attn_backend)
    h = x + attn.wo(y.reshape(b, t, -1))
    return h + block.mlp(block.mlp_norm(h))


@dataclass
class OutputError:
    rel_error: float  # ||Y' - Y||_F / ||Y||_F
    cosine: float  # mean over tokens of cos(y'_t, y_t)


@torch.no_grad()
def block_error(block, x, y, pk=None, pv=None, chunk_rows: int = 8) -> OutputError:
    """Error of the projected block's output against the original output y on inputs x (N, T, d)."""
    diff2 = ref2 = cos = 0.0
    for xs, ys in zip(x.split(chunk_rows), y.split(chunk_rows)):
        out = projected_block(block, xs, pk, pv).double()
        ys = ys.double()
        diff2 += float((out - ys).square().sum())
        ref2 += float(ys.square().sum())
        cos += float(F.cosine_similarity(out, ys, dim=-1).sum())
    return OutputError((diff2 / max(ref2, 1e-300)) ** 0.5, cos / (x.shape[0] * x.shape[1]))


@dataclass
class KVStats:
    """Second moments and per-channel statistics of one layer's pre-RoPE keys and values.

    gram_k = sum_t,g k_t,g^T k_t,g (d_h, d_h), pooled over the G heads (one key basis per layer);
    gram_v[g] = sum_t v_t,g^T v_t,g (G, d_h, d_h); mean/var per channel (keys pooled, values per head).
    """

    gram_k: torch.Tensor
    gram_v: torch.Tensor
    mean_k: torch.Tensor
    var_k: torch.Tensor
    mean_v: torch.Tensor
    var_v: torch.Tensor


@torch.no_grad()
def kv_statistics(block, x: torch.Tensor, chunk_rows: int = 8) -> KVStats:
    """Accumulate KVStats over the inputs x (N, T, d) in float64, chunk by chunk."""
    g, dh = block.attn.kv_heads, block.attn.head_dim
    gram_k, sum_k = torch.zeros(dh, dh, dtype=torch.float64), torch.zeros(dh, dtype=torch.float64)
    gram_v, sum_v = torch.zeros(g, dh, dh, dtype=torch.float64), torch.zeros(g, dh, dtype=torch.float64)
    n = 0
    for xs in x.split(chunk_rows):
        k, v = (t.double().flatten(0, 1).cpu() for t in keys_values(block, xs))  # (B T, G, d_h)
        gram_k += torch.einsum("ngd,nge->de", k, k)
        sum_k += k.sum((0, 1))
        gram_v += torch.einsum("ngd,nge->gde", v, v)
        sum_v += v.sum(0)
        n += k.shape[0]
    mean_k, mean_v = sum_k / (n * g), sum_v / n
    var_k = torch.diagonal(gram_k) / (n * g) - mean_k.square()
    var_v = torch.diagonal(gram_v, dim1=1, dim2=2) / n - mean_v.square()
    return KVStats(gram_k, gram_v, mean_k, var_k.clamp_min(0), mean_v, var_v.clamp_min(0))
