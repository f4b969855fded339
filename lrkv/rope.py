"""Rotary position embedding (RoPE), rotate-half convention.

The tables are computed from the positions on the fly (a (T, d/2) outer product, negligible next to
attention), so the model holds no position buffers: it works on the meta device, under FSDP and
with any position offset (KV-cache decoding).
"""

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim/2) in float32 for integer positions of shape (T,)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation of ``apply_rope`` with cos, sin already shaped to broadcast against x's halves (..., D/2).

    Without autograd (decoding) the halves are written into one output instead of concatenated, one
    allocation less in the decode loop; with autograd it is ``apply_rope``'s expression. Same values.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :d]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., d:]).addcmul_(x1, sin)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, T, H, D) by position: pairs (x_i, x_{i+D/2}) turn by +angle_t,i (as Llama/HF)."""
    d = x.shape[-1] // 2
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, D/2) broadcasts over heads
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
