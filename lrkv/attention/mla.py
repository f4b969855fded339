"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Keys and values of all heads come from one small latent per token, plus one shared RoPE key:

    c      = RMSNorm(x W_DKV)                      d -> d_c        (cached)
    k_r    = RoPE(x W_KR)                          d -> d_r        (cached, shared by heads)
    k_h    = [c W_UK,h ; k_r],  v_h = c W_UV,h     d_c -> d_h
    q_h    = [q_h^nope ; RoPE(q_h^rope)],  q = x W_Q  (or RMSNorm(x W_DQ) W_UQ with q_latent > 0)
    score  = q_h . k_h / sqrt(d_h + d_r)

KV cache per token and layer: d_c + d_r elements, kept as one contiguous buffer [c ; k_r] (B, T, d_c + d_r)
so that decoding reads it in place. (The LRKV paper counts d_c only; we report the honest d_c + d_r.)

Absorbed decoding: q_h^nope . (c W_UK,h) = (q_h^nope W_UK,h^T) . c, so the query is mapped into the
latent space and attends over the cached [c ; k_r] directly: one shared key head, never expanded across
heads, met by all query heads in one attention call (kernel.grouped_decode with G = 1), and
sum_t a_t (c_t W_UV,h) = (sum_t a_t c_t) W_UV,h, so W_UV is applied once to the attended latent. The
naive path expands per-head keys/values; it is used for training and for prefill into an empty cache.

QK-norm is not applied (as in DeepSeek): a per-head norm of c W_UK,h would break the absorption;
the latents c (and the query latent) are normalised instead. `model.qk_norm` has no effect here.
"""

import math

import torch

from lrkv.cache import LayerCache
from lrkv.errors import ConfigError
from lrkv.norm import RMSNorm
from lrkv.rope import apply_rope, rope_cos_sin

from . import register
from .base import Attention, linear
from .kernel import attend, grouped_decode


def _check_int(cfg, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"model.{name} must be an integer >= {low} for attention=mla, got {value!r}")


@register("mla")
class MultiHeadLatentAttention(Attention):
    fields = ("kv_latent", "q_latent", "rope_dim")
    absorb = "auto"  # auto: absorbed when decoding over earlier cached tokens; True/False force a path

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.kv_latent is None:
            raise ConfigError("model.kv_latent (d_c) is required for attention=mla (e.g. model.kv_latent=256)")
        cfg.rope_dim = 64 if cfg.rope_dim is None else cfg.rope_dim
        cfg.q_latent = 0 if cfg.q_latent is None else cfg.q_latent
        _check_int(cfg, "kv_latent", 1)
        _check_int(cfg, "rope_dim", 2)
        _check_int(cfg, "q_latent", 0)
        if cfg.rope_dim % 2:
            raise ConfigError(f"model.rope_dim must be even for RoPE, got {cfg.rope_dim}")

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        return cfg.kv_latent + cfg.rope_dim

    @classmethod
    def score_dims(cls, cfg) -> tuple[int, int]:
        return cfg.head_dim + cfg.rope_dim, cfg.head_dim

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        h, dh, d = self.n_head, self.head_dim, self.d_model
        self.d_c, self.d_r = cfg.kv_latent, cfg.rope_dim
        self.scale = 1.0 / math.sqrt(dh + self.d_r)
        if cfg.q_latent:
            self.w_dq = linear(d, cfg.q_latent)
            self.q_latent_norm = RMSNorm(cfg.q_latent, cfg.norm_eps, cfg.norm_affine)
            self.w_uq = linear(cfg.q_latent, h * (dh + self.d_r))
        else:
            self.wq = linear(d, h * (dh + self.d_r))
        self.w_dkv = linear(d, self.d_c)
        self.kv_norm = RMSNorm(self.d_c, cfg.norm_eps, cfg.norm_affine)
        self.w_kr = linear(d, self.d_r)
        self.w_uk = linear(self.d_c, h * dh)
        self.w_uv = linear(self.d_c, h * dh)
        self.wo = linear(h * dh, d)

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.bfloat16) -> LayerCache:
        return LayerCache(ckr=torch.zeros(batch_size, max_len, self.d_c + self.d_r, device=device, dtype=dtype))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_latent:
            return self.w_uq(self.q_latent_norm(self.w_dq(x)))
        return self.wq(x)

    def forward(self, x, cache=None, positions=None):
        b, t, _ = x.shape
        if positions is None:
            positions = self.default_positions(x, cache)
        q = self.queries(x).view(b, t, self.n_head, self.head_dim + self.d_r)
        q_nope, q_rope = q.split([self.head_dim, self.d_r], dim=-1)
        c = self.kv_norm(self.w_dkv(x))
        k_r = self.w_kr(x).view(b, t, 1, self.d_r)
        cos, sin = rope_cos_sin(positions, self.d_r, self.cfg.rope_theta)
        q_rope, k_r = apply_rope(q_rope, cos, sin), apply_rope(k_r, cos, sin)[:, :, 0]
        ckr = torch.cat([c, k_r], dim=-1)
        if cache is not None:
            ckr = cache.append(ckr=ckr.to(cache.buffers["ckr"].dtype))["ckr"].to(x.dtype)
        absorbed = self.absorb is True or (self.absorb == "auto" and ckr.shape[1] > t)
        if absorbed:
            y = self.attend_absorbed(q_nope, q_rope, ckr)
        else:
            y = self.attend_naive(q_nope, q_rope, *ckr.split([self.d_c, self.d_r], dim=-1))
        return self.wo(y.reshape(b, t, -1))

    def attend_naive(self, q_nope, q_rope, c, k_r):
        """Expand per-head keys [c W_UK,h ; k_r] and values c W_UV,h, then ordinary attention."""
        b, tk, h = c.shape[0], c.shape[1], self.n_head
        k_nope = self.w_uk(c).view(b, tk, h, self.head_dim)
        v = self.w_uv(c).view(b, tk, h, self.head_dim)
        k = torch.cat([k_nope, k_r[:, :, None, :].expand(b, tk, h, self.d_r)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attend(q, k, v, scale=self.scale, backend=self.cfg.attn_backend)

    def attend_absorbed(self, q_nope, q_rope, ckr):
        """Attend in latent space: queries [q W_UK^T ; q_rope] against [c ; k_r], then W_UV on the attended latent."""
        w_uk = self.w_uk.weight.view(self.n_head, self.head_dim, self.d_c)
        w_uv = self.w_uv.weight.view(self.n_head, self.head_dim, self.d_c)
        q = torch.cat([torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_rope], dim=-1)
        key = ckr[:, :, None, :]  # one shared key head, read in place; its first d_c columns are the values
        latent = grouped_decode(q, key, key[..., : self.d_c], scale=self.scale)  # (B, T, H, d_c)
        return torch.einsum("bthc,hdc->bthd", latent, w_uv)

    @torch.no_grad()
    def head_qk_maps(self):
        """Per-head query [W_Q,h^nope | W_Q,h^rope] and key [W_DKV W_UK,h^T | W_KR] maps, (H, d, d_h + d_r).

        Queries through a low-rank latent are W_DQ W_UQ,h; the latent norms' weights are folded in,
        the RMSNorm of c itself (a per-token scale) is left out.
        """
        h, dh, d, f64 = self.n_head, self.head_dim, self.d_model, torch.float64
        dq = dh + self.d_r
        if self.cfg.q_latent:
            w_dq = self.fold_norm_scale(self.w_dq.weight.to(f64).t(), self.q_latent_norm)
            wq = (w_dq @ self.w_uq.weight.to(f64).t()).view(d, h, dq).permute(1, 0, 2)
        else:
            wq = self.wq.weight.to(f64).view(h, dq, d).transpose(1, 2)
        w_dkv = self.fold_norm_scale(self.w_dkv.weight.to(f64).t(), self.kv_norm)  # d x d_c
        k_nope = w_dkv[None] @ self.w_uk.weight.to(f64).view(h, dh, self.d_c).transpose(1, 2)  # (H, d, d_h)
        k_rope = self.w_kr.weight.to(f64).t()[None].expand(h, d, self.d_r)
        return wq, torch.cat([k_nope, k_rope], dim=-1)
