"""An lrkv model in Hugging Face transformers (remote code: `trust_remote_code=True`).

This file is copied into every exported folder and imports only torch and transformers, never lrkv.
It reproduces lrkv's Transformer exactly (same parameter names, same operations):

    x = embed_norm(embed(tokens))                  embed_norm: RMSNorm or identity
    for each block:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))
    logits = softcap(lm_head(norm(x)))             cap * tanh(z / cap), or z when no cap

RMSNorm with or without learned weights, MLP relu2 | gelu | silu | swiglu, RoPE in the rotate-half
(Llama) convention, QK-norm before RoPE. Attention kinds (`config.attention_kind`) and what
`LrkvCache` stores per token and layer (B = batch, H heads, d_h head dim):

    mha/gqa/mqa     k, v: G x d_h each (post-norm, post-RoPE keys)
    mla             c: d_c (normalised latent), k_r: d_r (RoPE key shared by heads); decoding attends
                    in latent space with absorbed W_UK, W_UV
    lrkv            k_s, v_s: d_h each (shared projections), r_k, r_v: H x r (per-head latents);
                    decoding rebuilds keys chunk by chunk (k_s + R_K,h B_K,h^T, QK-norm, RoPE) with an
                    online softmax; values by associativity (attended latents times B_V once)
    lrkv, residual_rope=False (decoupled): the same tensors; score_h = RoPE(q_h).RoPE(k_s) + (q_h B_K,h).R_K,h
                    with QK-norm and RoPE on the shared key only; decoding never rebuilds keys
    compressed_kv   k: G x r_K (pre-RoPE key projections), v: G x r_V (value projections); keys are
                    expanded (k P_K^T) and rotated at every attended position

Positions are the cache slots (0, 1, ...). A 2-D `attention_mask` with zeros (left padding) masks
those keys; RoPE scores depend only on relative positions, so a padded row gives what it gives alone.
`position_ids` are therefore not needed and are ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # older transformers: a plain object with the same methods
    from transformers.cache_utils import Cache

    CacheLayerMixin = object

from .configuration_lrkv import LrkvConfig

_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


# ---- building blocks (as lrkv/norm.py, lrkv/rope.py, lrkv/attention/kernel.py) ------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, affine=False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (self.dim,), weight, self.eps)


def rope_cos_sin(positions, dim, theta):
    """cos, sin of shape (T, dim/2) in float32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D): pairs (x_i, x_{i+D/2}) turn by +angle (Llama/HF convention)."""
    d = x.shape[-1] // 2
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_mask(tq, tk, device):
    """Boolean (tq, tk), True = attend; the queries are the last tq positions (bottom-right aligned)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def attend(q, k, v, scale=None, mask=None):
    """Causal attention. q (B, Tq, H, D), k (B, Tk, G, D), v (B, Tk, G, Dv) -> (B, Tq, H, Dv).

    `mask`: None (plain causal) or a boolean (B, 1, Tq, Tk) that already includes causality.
    """
    tq, tk = q.shape[1], k.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    elif tq == tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif tq == 1:
        y = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_mask(tq, tk, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)


def linear(d_in, d_out):
    return nn.Linear(d_in, d_out, bias=False)


# ---- the cache -----------------------------------------------------------------------------------------------------
class LrkvCacheLayer(CacheLayerMixin):
    """Named tensors (B, T, ...) of one layer, grown along T by concatenation (what lrkv's LayerCache stores)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.tensors = {}
        self.keys = self.values = None  # the transformers layer interface; this layer stores named tensors
        self.is_initialized = False

    def lazy_initialization(self, key_states=None, value_states=None):
        self.is_initialized = True

    def append(self, **new):
        """Write new tensors (B, T, ...) after the stored ones; return every stored position."""
        if self.tensors and set(new) != set(self.tensors):
            raise ValueError(f"cache layer holds {sorted(self.tensors)}, got {sorted(new)}")
        for name, value in new.items():
            old = self.tensors.get(name)
            self.tensors[name] = value if old is None else torch.cat([old, value.to(old.dtype)], dim=1)
        self.is_initialized = True
        return dict(self.tensors)

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("LrkvCache layers store named tensors; the model calls append()")

    def get_seq_length(self):
        return next(iter(self.tensors.values())).shape[1] if self.tensors else 0

    def get_mask_sizes(self, query_length):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self):
        return -1

    @property
    def batch_size(self):
        return next(iter(self.tensors.values())).shape[0] if self.tensors else -1

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def reset(self):
        self.tensors = {}
        self.is_initialized = False

    def offload(self):
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove):
        if tokens_to_remove > 0:  # transformers' legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        if tokens_to_remove < 0:
            self.tensors = {k: v[:, :tokens_to_remove] for k, v in self.tensors.items()}

    def reorder_cache(self, beam_idx):
        self.tensors = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.tensors.items()}

    def batch_repeat_interleave(self, repeats):
        self.tensors = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors.items()}

    def batch_select_indices(self, indices):
        self.tensors = {k: v[indices] for k, v in self.tensors.items()}


class LrkvCache(Cache):
    """One LrkvCacheLayer per layer; holds exactly what lrkv's KVCache holds, growing with the sequence."""

    def __init__(self, num_layers):
        layers = [LrkvCacheLayer() for _ in range(num_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # transformers without layered caches
            super().__init__()
            self.layers = layers

    def get_seq_length(self, layer_idx=0):
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def nbytes(self):
        """Bytes of every stored tensor, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_per_token(self):
        """Bytes per cached token per sequence, all layers (lrkv's KVCache.nbytes_per_token)."""
        length, batch = self.get_seq_length(), self.layers[0].batch_size
        if length == 0:
            raise ValueError("the cache is empty: run a prefill before measuring bytes per token")
        return self.nbytes() / (batch * length)


# ---- attention kinds -----------------------------------------------------------------------------------------------
class AttentionBase(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.head_dim, self.d_model = config.num_attention_heads, config.head_dim, config.hidden_size

    def head_norm(self):
        if not self.config.qk_norm:
            return nn.Identity()
        return RMSNorm(self.head_dim, self.config.rms_norm_eps, self.config.norm_affine)

    def project_queries(self, x, positions):
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
        q = self.q_norm(self.wq(x).view(b, t, self.n_head, self.head_dim))
        return apply_rope(q, cos, sin)


class GroupedQueryAttention(AttentionBase):
    """mha (G = H), gqa, mqa (G = 1): query head h uses key/value head h // (H / G)."""

    def __init__(self, config, layer):
        super().__init__(config, layer)
        self.kv_heads = config.num_key_value_heads
        h, g, dh, d = self.n_head, self.kv_heads, self.head_dim, self.d_model
        self.wq, self.wk, self.wv, self.wo = linear(d, h * dh), linear(d, g * dh), linear(d, g * dh), linear(h * dh, d)
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()

    def forward(self, x, positions, cache=None, mask=None):
        b, t, _ = x.shape
        q = self.project_queries(x, positions)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
        k = apply_rope(self.k_norm(self.wk(x).view(b, t, self.kv_heads, self.head_dim)), cos, sin)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim)
        if cache is not None:
            kv = cache.append(k=k, v=v)
            k, v = kv["k"].to(q.dtype), kv["v"].to(q.dtype)
        return self.wo(attend(q, k, v, mask=mask).reshape(b, t, -1))


class LowRankKVAttention(AttentionBase):
    """LRKV: W_K,h = W_K,shared + U_K,h B_K,h^T (the same for V); exact decoding over shared K/V and latents."""

    decode_chunk = 1024

    def __init__(self, config, layer):
        super().__init__(config, layer)
        h, dh, d, r = self.n_head, self.head_dim, self.d_model, config.rank
        self.rank = r
        self.decoupled = getattr(config, "residual_rope", True) is False
        self.wq, self.wo = linear(d, h * dh), linear(h * dh, d)
        self.wk_shared, self.wv_shared = linear(d, dh), linear(d, dh)
        self.uk, self.uv = linear(d, h * r), linear(d, h * r)
        self.bk = nn.Parameter(torch.zeros(h, r, dh))
        self.bv = nn.Parameter(torch.zeros(h, r, dh))
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()

    def latents(self, x):
        b, t, _ = x.shape
        w = torch.cat([self.wk_shared.weight, self.wv_shared.weight, self.uk.weight, self.uv.weight])
        k_s, v_s, r_k, r_v = F.linear(x, w).split(
            [self.head_dim, self.head_dim, self.n_head * self.rank, self.n_head * self.rank], -1
        )
        return k_s, v_s, r_k.view(b, t, self.n_head, self.rank), r_v.view(b, t, self.n_head, self.rank)

    @staticmethod
    def expand(shared, latent, b_mat):
        return shared[:, :, None, :] + torch.einsum("bthr,hrd->bthd", latent, b_mat)

    def rope_keys(self, k, positions):
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
        return apply_rope(self.k_norm(k), cos, sin)

    def forward(self, x, positions, cache=None, mask=None):
        b, t, _ = x.shape
        if self.decoupled:
            return self.forward_decoupled(x, positions, cache, mask)
        q = self.project_queries(x, positions)
        k_s, v_s, r_k, r_v = self.latents(x)
        if cache is None or cache.get_seq_length() == 0:  # no older tokens: expand the new ones
            if cache is not None:
                cache.append(k_s=k_s, v_s=v_s, r_k=r_k, r_v=r_v)
            k = self.rope_keys(self.expand(k_s, r_k, self.bk), positions)
            y = attend(q, k, self.expand(v_s, r_v, self.bv), mask=mask)
        else:
            y = self.attend_cached(q, cache.append(k_s=k_s, v_s=v_s, r_k=r_k, r_v=r_v), mask)
        return self.wo(y.reshape(b, t, -1))

    def attend_cached(self, q, kv, mask):
        """Rebuild keys chunk by chunk (k_s + R_K B_K^T, QK-norm, RoPE), online softmax in float32, values by
        associativity (attended shared values + attended latents times B_V)."""
        dt = torch.promote_types(q.dtype, torch.float32)
        k_s, v_s, r_k, r_v = (kv[name].to(dt) for name in ("k_s", "v_s", "r_k", "r_v"))
        b, tq, h, dh = q.shape
        tk = k_s.shape[1]
        qf = q.to(dt).transpose(1, 2)
        scale = 1.0 / math.sqrt(dh)
        opts = dict(device=q.device, dtype=dt)
        m = torch.full((b, h, tq, 1), float("-inf"), **opts)
        l = torch.zeros(b, h, tq, 1, **opts)  # noqa: E741
        acc_s = torch.zeros(b, h, tq, dh, **opts)
        acc_r = torch.zeros(b, h, tq, self.rank, **opts)
        query_pos = torch.arange(tk - tq, tk, device=q.device)
        for start in range(0, tk, self.decode_chunk):
            end = min(start + self.decode_chunk, tk)
            pos = torch.arange(start, end, device=q.device)
            k = self.rope_keys(self.expand(k_s[:, start:end], r_k[:, start:end], self.bk.to(dt)), pos)
            s = torch.einsum("bhqd,bkhd->bhqk", qf, k) * scale
            if mask is None:
                s = s.masked_fill(pos[None, :] > query_pos[:, None], float("-inf"))
            else:
                s = s.masked_fill(~mask[..., start:end], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
            l = l * alpha + p.sum(-1, keepdim=True)  # noqa: E741
            acc_s = acc_s * alpha + torch.einsum("bhqk,bkd->bhqd", p, v_s[:, start:end])
            acc_r = acc_r * alpha + torch.einsum("bhqk,bkhr->bhqr", p, r_v[:, start:end])
            m = m_new
        out = (acc_s + torch.einsum("bhqr,hrd->bhqd", acc_r, self.bv.to(dt))) / l
        return out.transpose(1, 2).to(q.dtype)

    # ---- decoupled variant (residual_rope=False) --------------------------------------------------------------------
    def forward_decoupled(self, x, positions, cache, mask):
        """score_h(s,t) = RoPE_s(q_h).RoPE_t(k_s,t) + (q_h B_K,h).R_K,h,t with q_h = norm(x W_Q,h), k_s = norm(x W_K,s).

        The cache holds RoPE_t(k_s,t), v_s, R_K, R_V (the bytes of exact LRKV); keys are never rebuilt.
        """
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
        q_hat = self.q_norm(self.wq(x).view(b, t, self.n_head, self.head_dim))
        q = torch.cat([apply_rope(q_hat, cos, sin), torch.einsum("bthd,hrd->bthr", q_hat, self.bk)], dim=-1)
        k_s, v_s, r_k, r_v = self.latents(x)
        k_rot = apply_rope(self.k_norm(k_s[:, :, None, :]), cos, sin)[:, :, 0]
        if cache is not None:
            kv = cache.append(k_s=k_rot, v_s=v_s, r_k=r_k, r_v=r_v)
            k_rot, v_s, r_k, r_v = (kv[n].to(q.dtype) for n in ("k_s", "v_s", "r_k", "r_v"))
        tk = k_rot.shape[1]
        k = torch.cat([k_rot[:, :, None, :].expand(b, tk, self.n_head, self.head_dim), r_k], dim=-1)
        y = attend(q, k, self.expand(v_s, r_v, self.bv), scale=1.0 / math.sqrt(self.head_dim), mask=mask)
        return self.wo(y.reshape(b, t, -1))


class MultiHeadLatentAttention(AttentionBase):
    """MLA (DeepSeek-V2): latent c = RMSNorm(x W_DKV) and a shared RoPE key; absorbed decoding over the cache."""

    def __init__(self, config, layer):
        super().__init__(config, layer)
        h, dh, d = self.n_head, self.head_dim, self.d_model
        self.d_c, self.d_r = config.kv_latent, config.rope_dim
        self.q_latent = config.q_latent or 0
        self.scale = 1.0 / math.sqrt(dh + self.d_r)
        if self.q_latent:
            self.w_dq = linear(d, self.q_latent)
            self.q_latent_norm = RMSNorm(self.q_latent, config.rms_norm_eps, config.norm_affine)
            self.w_uq = linear(self.q_latent, h * (dh + self.d_r))
        else:
            self.wq = linear(d, h * (dh + self.d_r))
        self.w_dkv = linear(d, self.d_c)
        self.kv_norm = RMSNorm(self.d_c, config.rms_norm_eps, config.norm_affine)
        self.w_kr = linear(d, self.d_r)
        self.w_uk = linear(self.d_c, h * dh)
        self.w_uv = linear(self.d_c, h * dh)
        self.wo = linear(h * dh, d)

    def queries(self, x):
        return self.w_uq(self.q_latent_norm(self.w_dq(x))) if self.q_latent else self.wq(x)

    def forward(self, x, positions, cache=None, mask=None):
        b, t, _ = x.shape
        q = self.queries(x).view(b, t, self.n_head, self.head_dim + self.d_r)
        q_nope, q_rope = q.split([self.head_dim, self.d_r], dim=-1)
        c = self.kv_norm(self.w_dkv(x))
        k_r = self.w_kr(x).view(b, t, 1, self.d_r)
        cos, sin = rope_cos_sin(positions, self.d_r, self.config.rope_theta)
        q_rope, k_r = apply_rope(q_rope, cos, sin), apply_rope(k_r, cos, sin)[:, :, 0]
        if cache is not None:
            kv = cache.append(c=c, k_r=k_r)
            c, k_r = kv["c"].to(x.dtype), kv["k_r"].to(x.dtype)
        if c.shape[1] > t:  # decoding over older cached tokens: absorbed
            y = self.attend_absorbed(q_nope, q_rope, c, k_r, mask)
        else:
            y = self.attend_naive(q_nope, q_rope, c, k_r, mask)
        return self.wo(y.reshape(b, t, -1))

    def attend_naive(self, q_nope, q_rope, c, k_r, mask):
        b, tk, h = c.shape[0], c.shape[1], self.n_head
        k_nope = self.w_uk(c).view(b, tk, h, self.head_dim)
        v = self.w_uv(c).view(b, tk, h, self.head_dim)
        k = torch.cat([k_nope, k_r[:, :, None, :].expand(b, tk, h, self.d_r)], dim=-1)
        return attend(torch.cat([q_nope, q_rope], dim=-1), k, v, scale=self.scale, mask=mask)

    def attend_absorbed(self, q_nope, q_rope, c, k_r, mask):
        w_uk = self.w_uk.weight.view(self.n_head, self.head_dim, self.d_c)
        w_uv = self.w_uv.weight.view(self.n_head, self.head_dim, self.d_c)
        q = torch.cat([torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_rope], dim=-1)
        k = torch.cat([c, k_r], dim=-1)[:, :, None, :]  # one shared key head
        latent = attend(q, k, c[:, :, None, :], scale=self.scale, mask=mask)
        return torch.einsum("bthc,hdc->bthd", latent, w_uv)


class CompressedKVAttention(AttentionBase):
    """Projected-KV attention (post-training compression): cache key projections norm(x W_K) P_K (pre-RoPE) and
    value projections x W'_V; keys are expanded (k P_K^T) and rotated at the attended positions."""

    def __init__(self, config, layer):
        super().__init__(config, layer)
        self.kv_heads = config.num_key_value_heads
        self.k_rank, self.v_rank = config.k_ranks[layer], config.v_ranks[layer]
        h, g, dh, d = self.n_head, self.kv_heads, self.head_dim, self.d_model
        self.wq, self.wk = linear(d, h * dh), linear(d, g * dh)
        self.wv, self.wo = linear(d, g * self.v_rank), linear(h * self.v_rank, d)
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()
        self.register_buffer("pk", torch.eye(dh, self.k_rank))

    def forward(self, x, positions, cache=None, mask=None):
        b, t, _ = x.shape
        q = self.project_queries(x, positions)
        k = self.k_norm(self.wk(x).view(b, t, self.kv_heads, self.head_dim))
        k_lat, v_lat = k @ self.pk.to(k.dtype), self.wv(x).view(b, t, self.kv_heads, self.v_rank)
        key_positions = positions
        if cache is not None:
            kv = cache.append(k=k_lat, v=v_lat)
            k_lat, v_lat = kv["k"].to(q.dtype), kv["v"].to(q.dtype)
            tk = k_lat.shape[1]
            key_positions = torch.arange(tk, device=x.device) + (positions[-1] + 1 - tk)
        cos, sin = rope_cos_sin(key_positions, self.head_dim, self.config.rope_theta)
        k = apply_rope(k_lat @ self.pk.to(k_lat.dtype).T, cos, sin)
        y = attend(q, k, v_lat, scale=1.0 / math.sqrt(self.head_dim), mask=mask)
        return self.wo(y.reshape(b, t, self.n_head * self.v_rank))


KINDS = {
    "mha": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "mqa": GroupedQueryAttention,
    "lrkv": LowRankKVAttention,
    "mla": MultiHeadLatentAttention,
    "compressed_kv": CompressedKVAttention,
}


# ---- the model -----------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = config.hidden_act
        hidden = config.intermediate_size
        self.up = linear(config.hidden_size, 2 * hidden if self.act == "swiglu" else hidden)
        self.down = linear(hidden, config.hidden_size)

    def forward(self, x):
        h = self.up(x)
        if self.act == "relu2":
            h = F.relu(h).square()
        elif self.act == "gelu":
            h = F.gelu(h)
        elif self.act == "silu":
            h = F.silu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down(h)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        eps, affine = config.rms_norm_eps, config.norm_affine
        self.attn_norm = RMSNorm(config.hidden_size, eps, affine)
        self.attn = KINDS[config.attention_kind](config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, eps, affine)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache=None, mask=None):
        x = x + self.attn(self.attn_norm(x), positions, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class LrkvPreTrainedModel(PreTrainedModel):
    config_class = LrkvConfig
    base_model_prefix = ""
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # generate() must not build a DynamicCache: forward() creates an LrkvCache

    def _init_weights(self, module):
        """Only for weights missing from a checkpoint (an export has them all)."""
        try:
            from transformers import initialization as init
        except ImportError:
            init = nn.init
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        elif isinstance(module, LowRankKVAttention):
            init.normal_(module.bk, mean=0.0, std=0.02)
            init.normal_(module.bv, mean=0.0, std=0.02)


class LrkvForCausalLM(LrkvPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        if config.attention_kind not in KINDS:
            raise ValueError(f"attention_kind={config.attention_kind!r} is unknown; known: {', '.join(KINDS)}")
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        eps, affine = config.rms_norm_eps, config.norm_affine
        self.embed_norm = RMSNorm(config.hidden_size, eps, affine) if config.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps, affine)
        self.lm_head = None if config.tie_word_embeddings else linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self):
        return LrkvCache(self.config.num_hidden_layers)

    @staticmethod
    def padding_mask(attention_mask, past, t, device):
        """(B, 1, T, past + T) boolean: causal, padded keys masked, every query sees itself (no empty rows)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("LrkvForCausalLM takes a 2-D attention_mask (batch, past + new tokens) of 1s and 0s")
        keys = attention_mask[:, -(past + t) :].to(device=device, dtype=torch.bool)
        if bool(keys.all()):
            return None
        allowed = causal_mask(t, past + t, device)[None] & keys[:, None, :]
        own = torch.arange(past + t, device=device)[None, :] == torch.arange(past, past + t, device=device)[:, None]
        return (allowed | own[None])[:, None]

    def logits(self, h):
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, weight)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        cap = self.config.logit_softcap
        return cap * torch.tanh(z / cap) if cap else z

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, LrkvCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"LrkvForCausalLM needs an LrkvCache (model.new_cache()), got {type(cache).__name__}")
            cache = None
        if use_cache and cache is None:
            cache = self.new_cache()
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + t, device=x.device)
        mask = self.padding_mask(attention_mask, past, t, x.device)
        x = self.embed_norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, cache.layers[i] if cache is not None else None, mask)
        h = self.norm(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()
