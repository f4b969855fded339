"""Low-rank KV attention (LRKV, arXiv 2601.11471).

Each head's key/value projection is one full-rank projection shared by all heads plus a rank-r
residual of its own:

    W_K,h = W_K,shared + U_K,h B_K,h^T        W_K,shared: d -> d_h,  U_K,h: d -> r,  B_K,h: r x d_h
    k_h   = RoPE(norm(x W_K,shared + (x U_K,h) B_K,h^T)),   v_h = x W_V,shared + (x U_V,h) B_V,h^T

Queries, scores and the output projection are those of MHA. r = 0 is MQA; the cache matches MHA's
at r = d_h (1 - 1/H).

Training computes all heads at once ("factored": one GEMM for x [W_shared | U_1..U_H], then a batched
r x d_h GEMM per head) or folds W_K,h per step ("folded"); see bench/ for their speed.

KV cache per token and layer: the shared k_s = x W_K,shared and v_s (d_h each) and the latents
R_K,h = x U_K,h, R_V,h (r per head): 2 d_h + 2 H r elements, ratio to MHA 1/H + r/d_h. The full
per-head K, V are never stored.

Exact decoding. Values are exact by associativity: sum_t a_t v_h,t = (sum_t a_t v_s,t) +
(sum_t a_t R_V,h,t) B_V,h^T, so the attended r-dim latent is multiplied by B_V once. Keys are not:
RoPE is a position-dependent rotation and QK-norm is nonlinear, so q . RoPE_t(norm(k_s + B R_t)) does
not split into a shared and a low-rank score (the paper's shortcut is a different model). Decoding
therefore rebuilds each head's keys chunk by chunk (k_s + R_K B_K^T, norm, RoPE at the cached
positions) with an online softmax across chunks, never holding the whole per-head K.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lrkv.cache import LayerCache
from lrkv.errors import ConfigError
from lrkv.rope import apply_rope, rope_cos_sin

from . import register
from .base import Attention, linear, linear_std
from .kernel import attend


@register("lrkv")
class LowRankKVAttention(Attention):
    fields = ("rank", "residual_init", "lrkv_impl")
    decode_chunk = 1024  # cached positions whose keys are rebuilt at once during decoding

    @classmethod
    def validate(cls, cfg) -> None:
        r = cfg.rank
        if r is None:
            raise ConfigError("model.rank is required for attention=lrkv (e.g. model.rank=32)")
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= cfg.head_dim:
            raise ConfigError(f"model.rank={r!r} is outside [0, head_dim={cfg.head_dim}]; pick 0 <= rank <= head_dim")
        cfg.residual_init = 0.1 if cfg.residual_init is None else cfg.residual_init
        if not cfg.residual_init >= 0:
            raise ConfigError(f"model.residual_init must be >= 0, got {cfg.residual_init}")
        cfg.lrkv_impl = cfg.lrkv_impl or "factored"
        if cfg.lrkv_impl not in ("factored", "folded"):
            raise ConfigError(f"model.lrkv_impl={cfg.lrkv_impl!r} is unknown; use factored or folded")

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        return 2 * cfg.head_dim + 2 * cfg.n_head * cfg.rank

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        h, dh, d, r = self.n_head, self.head_dim, self.d_model, cfg.rank
        self.rank = r
        self.wq, self.wo = linear(d, h * dh), linear(h * dh, d)
        self.wk_shared, self.wv_shared = linear(d, dh), linear(d, dh)
        with warnings.catch_warnings():  # rank 0 (MQA) makes empty U matrices; their init is a no-op
            warnings.simplefilter("ignore", UserWarning)
            self.uk, self.uv = linear(d, h * r), linear(d, h * r)
        self.bk = nn.Parameter(torch.empty(h, r, dh))
        self.bv = nn.Parameter(torch.empty(h, r, dh))
        self.q_norm, self.k_norm = self.head_norm(), self.head_norm()

    def reset_parameters(self) -> None:
        """Paper init: shared projections like any linear; U, B small random with ||U_h B_h^T|| ~ residual_init ||W_shared||.

        With W_shared ~ N(0, s^2): U ~ N(0, s^2) and B ~ N(0, (residual_init / sqrt(r))^2) give
        ||U_h B_h^T||_F ~ sqrt(d d_h r) s residual_init / sqrt(r) = residual_init ||W_shared||_F.
        """
        super().reset_parameters()
        s = linear_std(self.head_dim, self.d_model)
        for u in (self.uk, self.uv):
            nn.init.normal_(u.weight, std=s)
        for b in (self.bk, self.bv):
            nn.init.normal_(b, std=self.cfg.residual_init / math.sqrt(max(self.rank, 1)))

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.bfloat16) -> LayerCache:
        h, dh, r = self.n_head, self.head_dim, self.rank

        def zeros(*shape):
            return torch.zeros(batch_size, max_len, *shape, device=device, dtype=dtype)

        return LayerCache(k_s=zeros(dh), v_s=zeros(dh), r_k=zeros(h, r), r_v=zeros(h, r))

    # ---- projections -------------------------------------------------------------------------
    def latents(self, x):
        """Shared k_s, v_s (B, T, d_h) and per-head latents R_K, R_V (B, T, H, r) from one GEMM."""
        b, t, _ = x.shape
        w = torch.cat([self.wk_shared.weight, self.wv_shared.weight, self.uk.weight, self.uv.weight])
        k_s, v_s, r_k, r_v = F.linear(x, w).split(
            [self.head_dim, self.head_dim, self.n_head * self.rank, self.n_head * self.rank], -1
        )
        return k_s, v_s, r_k.view(b, t, self.n_head, self.rank), r_v.view(b, t, self.n_head, self.rank)

    @staticmethod
    def expand(shared, latent, b_mat):
        """Per-head k_h = shared + R_h B_h^T: (B, T, d_h), (B, T, H, r), (H, r, d_h) -> (B, T, H, d_h)."""
        return shared[:, :, None, :] + torch.einsum("bthr,hrd->bthd", latent, b_mat)

    def folded_weight(self, shared, u, b_mat):
        """W_h = W_shared + U_h B_h^T for all heads, as one (H d_h, d) matrix."""
        u = u.weight.view(self.n_head, self.rank, self.d_model)
        return (shared.weight[None] + torch.einsum("hrd,hre->hde", b_mat, u)).reshape(-1, self.d_model)

    def keys_values(self, x):
        """Full per-head raw keys and values (before norm/RoPE) for the training path."""
        b, t, _ = x.shape
        shape = (b, t, self.n_head, self.head_dim)
        if self.cfg.lrkv_impl == "folded":
            k = F.linear(x, self.folded_weight(self.wk_shared, self.uk, self.bk)).view(shape)
            v = F.linear(x, self.folded_weight(self.wv_shared, self.uv, self.bv)).view(shape)
            return k, v
        k_s, v_s, r_k, r_v = self.latents(x)
        return self.expand(k_s, r_k, self.bk), self.expand(v_s, r_v, self.bv)

    def rope_keys(self, k, positions):
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)
        return apply_rope(self.k_norm(k), cos, sin)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, cache=None, positions=None):
        b, t, _ = x.shape
        if positions is None:
            positions = self.default_positions(x, cache)
        q, _ = self.project_queries(x, positions)
        if cache is None:
            k, v = self.keys_values(x)
            y = attend(q, self.rope_keys(k, positions), v, backend=self.cfg.attn_backend)
            return self.wo(y.reshape(b, t, -1))
        k_s, v_s, r_k, r_v = self.latents(x)
        first = cache.length == 0
        dtype = cache.buffers["k_s"].dtype
        kv = cache.append(k_s=k_s.to(dtype), v_s=v_s.to(dtype), r_k=r_k.to(dtype), r_v=r_v.to(dtype))
        if first:  # prefill into an empty cache: the ordinary path on the new tokens (nothing older to rebuild)
            k = self.rope_keys(self.expand(k_s, r_k, self.bk), positions)
            y = attend(q, k, self.expand(v_s, r_v, self.bv), backend=self.cfg.attn_backend)
        else:
            y = self.attend_cached(q, kv)
        return self.wo(y.reshape(b, t, -1))

    def attend_cached(self, q, kv):
        """Exact attention of q (B, Tq, H, d_h) over a cache of shared K/V and latents, chunk by chunk.

        Online softmax (running max m, normaliser l) in float32. Value side accumulates the attended
        shared values (d_h) and the attended latents (r) separately; B_V is applied once at the end.
        """
        dt = torch.promote_types(q.dtype, torch.float32)
        k_s, v_s, r_k, r_v = (kv[name].to(dt) for name in ("k_s", "v_s", "r_k", "r_v"))
        b, tq, h, dh = q.shape
        tk = k_s.shape[1]
        qf = q.to(dt).transpose(1, 2)  # (B, H, Tq, d_h)
        scale = 1.0 / math.sqrt(dh)
        opts = dict(device=q.device, dtype=dt)
        m = torch.full((b, h, tq, 1), float("-inf"), **opts)
        l = torch.zeros(b, h, tq, 1, **opts)
        acc_s = torch.zeros(b, h, tq, dh, **opts)
        acc_r = torch.zeros(b, h, tq, self.rank, **opts)
        query_pos = torch.arange(tk - tq, tk, device=q.device)
        for start in range(0, tk, self.decode_chunk):
            end = min(start + self.decode_chunk, tk)
            pos = torch.arange(start, end, device=q.device)
            k = self.rope_keys(self.expand(k_s[:, start:end], r_k[:, start:end], self.bk.to(dt)), pos)
            s = torch.einsum("bhqd,bkhd->bhqk", qf, k) * scale
            s = s.masked_fill(pos[None, :] > query_pos[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
            l = l * alpha + p.sum(-1, keepdim=True)
            acc_s = acc_s * alpha + torch.einsum("bhqk,bkd->bhqd", p, v_s[:, start:end])
            acc_r = acc_r * alpha + torch.einsum("bhqk,bkhr->bhqr", p, r_v[:, start:end])
            m = m_new
        out = (acc_s + torch.einsum("bhqr,hrd->bhqd", acc_r, self.bv.to(dt))) / l
        return out.transpose(1, 2).to(q.dtype)

    @torch.no_grad()
    def head_qk_maps(self):
        """W_Q,h and W_K,h = W_K,shared + U_K,h B_K,h^T, each (H, d, d_h) in float64."""
        h, dh, d, r, f64 = self.n_head, self.head_dim, self.d_model, self.rank, torch.float64
        wq = self.wq.weight.to(f64).view(h, dh, d).transpose(1, 2)
        wk = self.wk_shared.weight.to(f64).t()[None].expand(h, d, dh)
        if r:
            wk = wk + self.uk.weight.to(f64).view(h, r, d).transpose(1, 2) @ self.bk.to(f64)
        return self.fold_norm_scale(wq, self.q_norm), self.fold_norm_scale(wk, self.k_norm)
