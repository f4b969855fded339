"""The interface every attention kind implements.

    attn = Kind(cfg, layer)                        # cfg: ModelConfig, layer: index in the stack
    y = attn(x, cache=None, positions=None)        # x (B, T, d) -> (B, T, d)
    cache = attn.new_cache(batch, max_len, device, dtype)   # a LayerCache with what the kind needs

Weight-level views used by analyses (head diversity, post-training compression), so that those
never branch on kind names: `head_qk_maps()` gives each head's query and key maps x -> q_h, x -> k_h
(before norms and RoPE; learnable norm weights folded in), `keys_values(x)` the per-head raw keys and
values before QK-norm and RoPE (kinds whose keys are not a linear map of x per head, such as MLA,
do not define it).

Class-level facts used by configs, footprint and FLOP counts (no instance needed, so they work for
6.3B presets without memory): `fields`, `validate(cfg)`, `cache_elements_per_token(cfg)`,
`score_dims(cfg)`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from lrkv.cache import LayerCache
from lrkv.norm import RMSNorm
from lrkv.rope import apply_rope, rope_cos_sin


def linear_std(fan_out: int, fan_in: int) -> float:
    """std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)) (nanochat's init, arXiv 2310.17813)."""
    return 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


def init_linear_(weight: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(weight, mean=0.0, std=linear_std(weight.shape[0], weight.shape[1]))


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class Attention(nn.Module):
    kind: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()  # ModelConfig fields this kind owns (see config.KIND_FIELDS)

    def __init__(self, cfg, layer: int = 0):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.head_dim, self.d_model = cfg.n_head, cfg.head_dim, cfg.d_model

    # ---- class-level facts ------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg) -> None:
        """Fill the kind's defaults in cfg and raise ConfigError (one line, naming the field) if invalid."""

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        """KV-cache elements stored per token for one layer."""
        raise NotImplementedError

    @classmethod
    def layer_cache_elements(cls, cfg, layer: int) -> int:
        """Elements per token for layer `layer`; override when layers differ (e.g. per-layer ranks)."""
        return cls.cache_elements_per_token(cfg)

    @classmethod
    def has_triton_decode(cls, cfg) -> bool:
        """Whether model.decode_backend=triton has a kernel for this kind (exact LRKV only)."""
        return False

    @classmethod
    def score_dims(cls, cfg) -> tuple[int, int]:
        """(query/key dim, value dim) per head, for the attention FLOP count."""
        return cfg.head_dim, cfg.head_dim

    # ---- instance interface -------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.bfloat16) -> LayerCache:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, positions: torch.Tensor | None = None):
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Default init: every Linear normal (see init_linear_), the output projection zero if configured."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear_(module.weight)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if self.cfg.zero_init_out:
            nn.init.zeros_(self.wo.weight)

    # ---- weight-level views (analyses) --------------------------------------------------------------
    def head_qk_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_Q, W_K) of every head as (H, d, e) float64: x W_Q,h = q_h and x W_K,h = k_h before RoPE.

        Norms are per-token scales and RoPE a rotation, so they are left out; learnable norm weights
        (`norm_affine`) are folded in as diagonal scales. Kinds used by head diversity implement this.
        """
        raise NotImplementedError(f"attention={self.kind!r} does not define head_qk_maps(); add it to its file")

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and values (B, T, G, d_h) per key/value head, before QK-norm and RoPE."""
        raise NotImplementedError(f"attention={self.kind!r} does not define keys_values(); add it to its file")

    # ---- helpers shared by the kinds ------------------------------------------------------------
    def head_norm(self) -> nn.Module:
        """QK-norm module for one head vector (identity when cfg.qk_norm is off)."""
        if not self.cfg.qk_norm:
            return nn.Identity()
        return RMSNorm(self.head_dim, self.cfg.norm_eps, self.cfg.norm_affine)

    def project_queries(self, x: torch.Tensor, positions: torch.Tensor):
        """q_h = RoPE(norm(x W_Q,h)) of shape (B, T, H, d_h), and the RoPE tables (cos, sin) of these positions."""
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)
        q = self.q_norm(self.wq(x).view(b, t, self.n_head, self.head_dim))
        return apply_rope(q, cos, sin), (cos, sin)

    @staticmethod
    def fold_norm_scale(w: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """w (..., d, d_out) with a learnable norm weight (a diagonal scale on the output dims) folded in."""
        weight = getattr(norm, "weight", None)
        return w * weight.to(w.dtype) if weight is not None else w

    @staticmethod
    def default_positions(x: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        return torch.arange(start, start + x.shape[1], device=x.device)
