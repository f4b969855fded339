"""Projected-KV attention: a full-attention (MHA/GQA) layer whose cache holds low-rank projections.

This is the inference form of post-training KV compression (EigenAttention, StiefAttention; see
lrkv/compress/ and docs/design-notes.md §6). Each layer has orthonormal bases

    P_K   : d_h x r_K        one per layer, shared by the G key/value heads
    P_V,g : d_h x r_V        one per key/value head g

and computes, for query head h in group g = h // (H/G),

    q_h     = RoPE(norm(x W_Q,h))
    k_lat,g = norm(x W_K,g) P_K                      (B, T, G, r_K)  cached: pre-RoPE latent
    k_g     = RoPE(k_lat,g P_K^T)                     expanded before RoPE, at every attended position
    v_lat,g = x W'_V,g,   W'_V,g = W_V,g P_V,g        (B, T, G, r_V)  cached: values never expanded
    y       = concat_h softmax(q_h k_g^T / sqrt(d_h)) v_lat,g  W'_O,   W'_O,h = W_O,h P_V,g

so sum_t a_t v_g,t P_V,g^T W_O,h = (sum_t a_t v_lat,g,t) (W_O,h P_V,g)^T: the value basis is folded
into W_V and W_O. Keys cannot be folded the same way: QK-norm is nonlinear and RoPE depends on the
position, so the latent is taken after the norm and expanded before RoPE.

Hyperparameters: `kv_heads` (G of the source model, a ModelConfig field this kind owns) and
`attn_options`:

    k_ranks, v_ranks    per-layer ranks (a list of n_layer ints in [1, head_dim], or one int for all)
    method, source, budget, allocator, kv_ratio     provenance, not used by the computation

KV cache per token and layer: G (r_K + r_V) elements, i.e. (r_K + r_V) / (2 d_h) of the source's.
At r_K = r_V = d_h with any orthonormal bases the layer computes exactly what the source layer does.
Decoding expands the cached key latents of one layer at a time (a transient of the source layer's
key size); a fused kernel that expands on chip (Palu-style) is left for later.
"""

from __future__ import annotations

import math

import torch

from lrkv.cache import LayerCache
from lrkv.errors import ConfigError
from lrkv.rope import apply_rope, rope_cos_sin

from . import register
from .base import Attention, linear
from .gqa import check_kv_heads
from .kernel import attend

KIND = "compressed_kv"
META_OPTIONS = ("method", "source", "budget", "allocator", "kv_ratio")


def per_layer_ranks(cfg, name: str) -> list[int]:
    """attn_options[name] as a list of n_layer ints in [1, head_dim]; ConfigError (one line) otherwise."""
    value = cfg.attn_options.get(name)
    field = f"model.attn_options.{name}"
    if value is None:
        raise ConfigError(f"{field} is required for attention={KIND} (one int or a list of n_layer ints)")
    ranks = [value] * cfg.n_layer if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ranks, (list, tuple)) or len(ranks) != cfg.n_layer:
        raise ConfigError(f"{field} must be one int or a list of n_layer={cfg.n_layer} ints, got {value!r}")
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= cfg.head_dim:
            raise ConfigError(f"{field} has rank {r!r} outside [1, head_dim={cfg.head_dim}]; use ranks in that range")
    return list(ranks)


@register(KIND)
class CompressedKVAttention(Attention):
    fields = ("kv_heads",)

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.kv_heads is None:
            cfg.kv_heads = cfg.n_head
        check_kv_heads(cfg, cls.kind)
        known = ("k_ranks", "v_ranks") + META_OPTIONS
        unknown = sorted(set(cfg.attn_options) - set(known))
        if unknown:
            raise ConfigError(
                f"model.attn_options.{unknown[0]} is unknown for attention={KIND}; known: {', '.join(known)}"
            )
        cfg.attn_options["k_ranks"] = per_layer_ranks(cfg, "k_ranks")
        cfg.attn_options["v_ranks"] = per_layer_ranks(cfg, "v_ranks")

    @classmethod
    def layer_cache_elements(cls, cfg, layer: int) -> int:
        return cfg.kv_heads * (cfg.attn_options["k_ranks"][layer] + cfg.attn_options["v_ranks"][layer])

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        """The largest layer's elements (layers differ; the exact total sums layer_cache_elements)."""
        return max(cls.layer_cache_elements(cfg, layer) for layer in range(cfg.n_layer))

    @classmethod
    def score_dims(cls, cfg) -> tuple[int, int]:
        v_ranks = cfg.attn_options["v_ranks"]
        return cfg.head_dim, round(sum(v_ranks) / len(v_ranks))

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        self.kv_heads = cfg.kv_heads
        self.k_rank = cfg.attn_options["k_ranks"][layer]
        self.v_rank = cfg.attn_options["v_ranks"][layer]
        h, g, dh, d = self.n_head, self.kv_heads, self.head_dim, self.d_model
        self.wq, self.wk = linear(d, h * dh), linear(d, g * dh)
        self.wv, self.wo = linear(d, g * self.v_rank), linear(h * self.v_rank, d)
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()
        self.register_buffer("pk", torch.empty(dh, self.k_rank))  # orthonormal columns: the key basis

    def reset_parameters(self) -> None:
        """Linear init as every kind; the key basis starts as the first r_K coordinate axes."""
        super().reset_parameters()
        with torch.no_grad():
            self.pk.copy_(torch.eye(self.head_dim, self.k_rank, device=self.pk.device, dtype=self.pk.dtype))

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.bfloat16) -> LayerCache:
        shape = (batch_size, max_len, self.kv_heads)
        return LayerCache(
            k=torch.zeros(*shape, self.k_rank, device=device, dtype=dtype),
            v=torch.zeros(*shape, self.v_rank, device=device, dtype=dtype),
        )

    def latents(self, x):
        """Key latents norm(x W_K) P_K (B, T, G, r_K) and value latents x W'_V (B, T, G, r_V)."""
        b, t, _ = x.shape
        k = self.k_norm(self.wk(x).view(b, t, self.kv_heads, self.head_dim))
        return k @ self.pk.to(k.dtype), self.wv(x).view(b, t, self.kv_heads, self.v_rank)

    def expand_keys(self, k_lat, positions):
        """RoPE(k_lat P_K^T) at the given positions: (B, T, G, r_K) -> (B, T, G, d_h)."""
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)
        return apply_rope(k_lat @ self.pk.to(k_lat.dtype).T, cos, sin)

    def forward(self, x, cache=None, positions=None):
        b, t, _ = x.shape
        if positions is None:
            positions = self.default_positions(x, cache)
        q, _ = self.project_queries(x, positions)
        k_lat, v_lat = self.latents(x)
        key_positions = positions
        if cache is not None:
            kv = cache.append(k=k_lat.to(cache.buffers["k"].dtype), v=v_lat.to(cache.buffers["v"].dtype))
            k_lat, v_lat = kv["k"].to(q.dtype), kv["v"].to(q.dtype)
            tk = k_lat.shape[1]  # cached positions are contiguous and end at the last query position
            key_positions = torch.arange(tk, device=x.device) + (positions[-1] + 1 - tk)
        k = self.expand_keys(k_lat, key_positions)
        y = attend(q, k, v_lat, scale=1.0 / math.sqrt(self.head_dim), backend=self.cfg.attn_backend)
        return self.wo(y.reshape(b, t, self.n_head * self.v_rank))
