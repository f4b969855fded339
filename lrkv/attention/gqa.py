"""Grouped-query attention (GQA): H query heads share G key/value heads.

    q_h = RoPE(norm(x W_Q,h)),  k_g = RoPE(norm(x W_K,g)),  v_g = x W_V,g      W_K, W_V: d -> G*d_h
    head h attends with key/value group g = h // (H/G)
    y = concat_h softmax(q_h k_g^T / sqrt(d_h) + causal) v_g  W_O

KV cache per token and layer: k and v of the G groups, 2*G*d_h elements (post-norm, post-RoPE keys),
stored head-major so that decoding reads each group's keys as contiguous rows (kernel.grouped_decode).
MHA is G = H (mha.py), MQA is G = 1 (mqa.py).
"""

import torch

from lrkv.cache import LayerCache
from lrkv.errors import ConfigError
from lrkv.rope import apply_rope

from . import register
from .base import Attention, linear
from .kernel import attend


def check_kv_heads(cfg, kind: str) -> None:
    g = cfg.kv_heads
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ConfigError(f"model.kv_heads must be a positive integer for attention={kind}, got {g!r}")
    if cfg.n_head % g:
        raise ConfigError(
            f"model.n_head={cfg.n_head} is not divisible by model.kv_heads={g}; pick kv_heads that divides n_head"
        )


@register("gqa")
class GroupedQueryAttention(Attention):
    fields = ("kv_heads",)

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.kv_heads is None:
            raise ConfigError("model.kv_heads is required for attention=gqa (e.g. model.kv_heads=2)")
        check_kv_heads(cfg, cls.kind)

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        return 2 * cfg.kv_heads * cfg.head_dim

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        self.kv_heads = cfg.kv_heads
        h, g, dh, d = self.n_head, self.kv_heads, self.head_dim, self.d_model
        self.wq, self.wk, self.wv, self.wo = linear(d, h * dh), linear(d, g * dh), linear(d, g * dh), linear(h * dh, d)
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.bfloat16) -> LayerCache:
        """k, v of shape (B, max_len, G, d_h), stored head-major: each K/V head's positions are contiguous rows."""

        def zeros():
            shape = (batch_size, self.kv_heads, max_len, self.head_dim)
            return torch.zeros(shape, device=device, dtype=dtype).transpose(1, 2)

        return LayerCache(k=zeros(), v=zeros())

    def forward(self, x, cache=None, positions=None):
        b, t, _ = x.shape
        if positions is None:
            positions = self.default_positions(x, cache)
        q, (cos, sin) = self.project_queries(x, positions)
        k, v = self.keys_values(x)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            kv = cache.append(k=k.to(cache.buffers["k"].dtype), v=v.to(cache.buffers["v"].dtype))
            k, v = kv["k"].to(q.dtype), kv["v"].to(q.dtype)
        y = attend(q, k, v, backend=self.cfg.attn_backend)
        return self.wo(y.reshape(b, t, -1))

    def keys_values(self, x):
        b, t, _ = x.shape
        return self.wk(x).view(b, t, self.kv_heads, self.head_dim), self.wv(x).view(b, t, self.kv_heads, self.head_dim)

    @torch.no_grad()
    def head_qk_maps(self):
        """W_Q,h and the key map of h's group g = h // (H/G), each (H, d, d_h) in float64."""
        h, dh, d, f64 = self.n_head, self.head_dim, self.d_model, torch.float64
        wq = self.wq.weight.to(f64).view(h, dh, d).transpose(1, 2)
        wk = self.wk.weight.to(f64).view(self.kv_heads, dh, d).transpose(1, 2)
        wk = wk.repeat_interleave(h // self.kv_heads, dim=0)
        return self.fold_norm_scale(wq, self.q_norm), self.fold_norm_scale(wk, self.k_norm)
