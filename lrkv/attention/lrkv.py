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
therefore rebuilds each head's keys chunk by chunk (k_s + R_K B_K^T in one batched GEMM, RoPE from
a table computed once per length, the norm applied to the scores) with an online softmax across
chunks, never holding the whole per-head K and never copying the whole cache to another dtype.
`model.decode_backend` picks this torch path or the fused Triton kernel (lrkv_triton.py, which
rebuilds the keys on chip).

Decoupled RoPE (`model.residual_rope=false`, a different model, not the paper's). RoPE and QK-norm act
on the shared key only; each head's residual is a position-free channel scored with the normalised,
un-rotated query q^_h = norm(x W_Q,h):

    score_h(s, t) = RoPE_s(q^_h) . RoPE_t(k^_s,t) + (q^_h B_K,h^T) . R_K,h,t      k^_s = norm(x W_K,shared)
                  = [RoPE_s(q^_h) ; q^_h B_K,h^T] . [RoPE_t(k^_s,t) ; R_K,h,t]     (d_h + r dims, scale 1/sqrt(d_h))

Training is one attention call over the concatenated d_h + r dims (value dim d_h). The cache holds
RoPE_t(k^_s,t) (rotated and normalised), v_s, R_K and R_V: the same bytes as exact LRKV. Decoding never
rebuilds keys: one shared key (an MQA-style GEMM) plus an r-dim latent score per head.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lrkv.cache import LayerCache
from lrkv.errors import ConfigError
from lrkv.norm import RMSNorm
from lrkv.rope import apply_rope, rope_cos_sin, rotate

from . import register
from .base import Attention, linear, linear_std
from .kernel import attend, causal_mask


@register("lrkv")
class LowRankKVAttention(Attention):
    fields = ("rank", "residual_init", "lrkv_impl", "residual_rope")
    decode_chunk = 1024  # cached positions whose keys are rebuilt at once by the torch decode path
    triton_block_t, triton_programs = 32, 1024  # the Triton kernel's block of cached positions, grid size target

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
        cfg.residual_rope = True if cfg.residual_rope is None else cfg.residual_rope
        if not isinstance(cfg.residual_rope, bool):
            raise ConfigError(f"model.residual_rope must be true or false, got {cfg.residual_rope!r}")
        if not cfg.residual_rope and cfg.lrkv_impl == "folded":
            raise ConfigError("model.lrkv_impl=folded needs residual_rope=true; decoupled LRKV trains factored")

    @classmethod
    def has_triton_decode(cls, cfg) -> bool:
        return bool(cfg.residual_rope)

    @classmethod
    def cache_elements_per_token(cls, cfg) -> int:
        return 2 * cfg.head_dim + 2 * cfg.n_head * cfg.rank

    @classmethod
    def score_dims(cls, cfg) -> tuple[int, int]:
        return cfg.head_dim + (0 if cfg.residual_rope is not False else cfg.rank), cfg.head_dim

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
        self._rope_table: torch.Tensor | None = None  # [cos | sin] of positions 0..n-1 (decoding)

    def reset_parameters(self) -> None:
        """Paper init: shared projections like any linear; U, B small, ||U_h B_h^T|| ~ residual_init ||W_shared||.

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

    def rope_table(self, n: int, device) -> torch.Tensor:
        """[cos | sin] (n, d_h) float32 of positions 0..n-1, kept between decode steps (grown by doubling)."""
        device, table = torch.device(device), self._rope_table
        if table is not None and table.device != device:
            table = None
        if table is None or table.shape[0] < n:
            size = n if table is None else max(n, 2 * table.shape[0])
            table = torch.cat(rope_cos_sin(torch.arange(size, device=device), self.head_dim, self.cfg.rope_theta), -1)
            self._rope_table = table
        return table[:n]

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, cache=None, positions=None):
        b, t, _ = x.shape
        if positions is None:
            positions = self.default_positions(x, cache)
        if not self.cfg.residual_rope:
            return self.wo(self.forward_decoupled(x, cache, positions).reshape(b, t, -1))
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
        elif self.decode_backend(q.device) == "triton":
            from .lrkv_triton import lrkv_decode

            y = lrkv_decode(q, kv, self)
        else:
            y = self.attend_cached(q, kv)
        return self.wo(y.reshape(b, t, -1))

    def decode_backend(self, device) -> str:
        """torch or triton for exact cached decoding (model.decode_backend; auto: triton on CUDA when usable)."""
        choice = self.cfg.decode_backend
        if choice == "torch":
            return "torch"
        from .lrkv_triton import triton_unavailable

        reason = triton_unavailable(device)
        if choice == "auto":
            return "torch" if reason or torch.device(device).type != "cuda" else "triton"
        if reason:
            raise ConfigError(f"model.decode_backend=triton cannot run: {reason}; use decode_backend=torch or auto")
        return "triton"

    def attend_cached(self, q, kv):
        """Exact attention of q (B, Tq, H, d_h) over a cache of shared K/V and latents, chunk by chunk.

        Per chunk of C cached positions: the raw keys y = k_s + R_K B_K^T of all heads in one batched GEMM,
        RoPE from the table kept between steps, scores (B, H, Tq, C). QK-norm without a weight is a
        per-key scalar, applied to the scores: q . RoPE(y / rms(y)) = (q . RoPE(y)) / rms(y). Online
        softmax (running max m, normaliser l) in float32. The value side reads the cache in place as
        (B, C, d_h) and (B, C, H r) matrices: the attended shared values p v_s, and the attended latents
        of every head against every head's probabilities (an H-fold larger but copy-free GEMM) of which
        the diagonal blocks are kept; B_V is applied once at the end. Each chunk is cast to float32 on its
        own (no whole-cache copy).
        """
        k_s, v_s, r_k, r_v = (kv[name] for name in ("k_s", "v_s", "r_k", "r_v"))
        b, tq, h, dh = q.shape
        tk, r, half = k_s.shape[1], self.rank, dh // 2
        dt = torch.promote_types(q.dtype, torch.float32)
        qf = q.to(dt).transpose(1, 2) * (1.0 / math.sqrt(dh))  # (B, H, Tq, d_h), scale folded in
        bk, bv = self.bk.to(dt), self.bv.to(dt)
        table = self.rope_table(tk, q.device)
        scalar_norm = isinstance(self.k_norm, RMSNorm) and self.k_norm.weight is None
        opts = dict(device=q.device, dtype=dt)
        m = torch.full((b, h, tq, 1), float("-inf"), **opts)
        l = torch.zeros(b, h, tq, 1, **opts)
        acc_s = torch.zeros(b, h * tq, dh, **opts)
        acc_r = torch.zeros(b, h * tq, h * r, **opts)
        mask = causal_mask(tq, tk, q.device) if tq > 1 else None
        for start in range(0, tk, self.decode_chunk):
            end = min(start + self.decode_chunk, tk)
            c = end - start
            rk = r_k[:, start:end].to(dt).permute(0, 2, 1, 3)  # (B, H, C, r)
            k = torch.matmul(rk, bk).add_(k_s[:, None, start:end].to(dt))  # raw keys (B, H, C, d_h)
            if scalar_norm:
                inv = torch.rsqrt(torch.linalg.vecdot(k, k) / dh + self.k_norm.eps)  # (B, H, C)
            else:
                k = self.k_norm(k)
            cos, sin = table[start:end, :half].to(dt), table[start:end, half:].to(dt)
            s = torch.matmul(qf, rotate(k, cos, sin).transpose(-1, -2))  # (B, H, Tq, C)
            if scalar_norm:
                s = s * inv[:, :, None, :]
            if mask is not None:
                s = s.masked_fill(~mask[:, start:end], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
            l = l * alpha + p.sum(-1, keepdim=True)
            p = p.reshape(b, h * tq, c)
            alpha = alpha.reshape(b, h * tq, 1)
            acc_s = torch.baddbmm(acc_s * alpha, p, v_s[:, start:end].to(dt))
            if r:
                acc_r = torch.baddbmm(acc_r * alpha, p, r_v[:, start:end].to(dt).reshape(b, c, h * r))
            m = m_new
        out = acc_s.view(b, h, tq, dh) + own_head_latents(acc_r, h, tq, r) @ bv
        return (out / l).transpose(1, 2).to(q.dtype)

    # ---- decoupled RoPE (residual_rope=false) ------------------------------------------------
    def forward_decoupled(self, x, cache, positions):
        """Decoupled LRKV attention output (B, T, H, d_h) before W_O; see the module docstring."""
        b, t, _ = x.shape
        h, dh = self.n_head, self.head_dim
        cos, sin = rope_cos_sin(positions, dh, self.cfg.rope_theta)
        q_hat = self.q_norm(self.wq(x).view(b, t, h, dh))
        q_rot = apply_rope(q_hat, cos, sin)
        q_lat = torch.einsum("bthd,hrd->bthr", q_hat, self.bk)  # q^_h B_K,h^T: (B, T, H, r)
        k_s, v_s, r_k, r_v = self.latents(x)
        k_rot = apply_rope(self.k_norm(k_s)[:, :, None], cos, sin)[:, :, 0]  # RoPE_t(k^_s,t): (B, T, d_h)
        if cache is not None:
            dtype = cache.buffers["k_s"].dtype
            first = cache.length == 0
            kv = cache.append(k_s=k_rot.to(dtype), v_s=v_s.to(dtype), r_k=r_k.to(dtype), r_v=r_v.to(dtype))
            if not first:
                return self.attend_decoupled_cached(q_rot, q_lat, kv)
        q = torch.cat([q_rot, q_lat], dim=-1)
        k = torch.cat([k_rot[:, :, None].expand(b, t, h, dh), r_k], dim=-1)
        return attend(q, k, self.expand(v_s, r_v, self.bv), scale=1.0 / math.sqrt(dh), backend=self.cfg.attn_backend)

    def attend_decoupled_cached(self, q_rot, q_lat, kv):
        """Decode over the cache without rebuilding keys: (B, Tq, H, d_h) queries -> (B, Tq, H, d_h).

        Scores = one shared rotated key for all heads, (B, H Tq, d_h) @ (B, d_h, T) as in MQA, plus the
        latent scores, a block-diagonal (B, H Tq, H r) query matrix against R_K read in place as
        (B, T, H r). Values as in exact decoding (attended v_s and latents, then B_V once).
        """
        b, tq, h, dh = q_rot.shape
        r = self.rank
        dt = q_rot.dtype
        k, v_s = kv["k_s"].to(dt), kv["v_s"].to(dt)
        r_k, r_v = kv["r_k"].to(dt), kv["r_v"].to(dt)
        tk = k.shape[1]
        scale = 1.0 / math.sqrt(dh)
        q = q_rot.transpose(1, 2).reshape(b, h * tq, dh) * scale
        s = torch.bmm(q, k.transpose(1, 2))  # (B, H Tq, T)
        if r:
            q_bd = q_rot.new_zeros(b, h, tq, h, r)
            torch.diagonal(q_bd, dim1=1, dim2=3).copy_(q_lat.permute(0, 1, 3, 2) * scale)  # (B, Tq, r, H) view
            s = torch.baddbmm(s, q_bd.view(b, h * tq, h * r), r_k.reshape(b, tk, h * r).transpose(1, 2))
        if tq > 1:
            s = s.view(b, h, tq, tk).masked_fill(~causal_mask(tq, tk, s.device), float("-inf")).view(b, h * tq, tk)
        p = torch.softmax(s.float(), dim=-1).to(dt)
        out = torch.bmm(p, v_s).view(b, h, tq, dh)
        if r:
            attended = torch.bmm(p, r_v.reshape(b, tk, h * r))  # (B, H Tq, H r)
            out = out + own_head_latents(attended, h, tq, r) @ self.bv.to(dt)
        return out.transpose(1, 2)

    @torch.no_grad()
    def head_qk_maps(self):
        """W_Q,h and W_K,h = W_K,shared + U_K,h B_K,h^T, each (H, d, d_h) in float64."""
        h, dh, d, r, f64 = self.n_head, self.head_dim, self.d_model, self.rank, torch.float64
        wq = self.wq.weight.to(f64).view(h, dh, d).transpose(1, 2)
        wk = self.wk_shared.weight.to(f64).t()[None].expand(h, d, dh)
        if r:
            wk = wk + self.uk.weight.to(f64).view(h, r, d).transpose(1, 2) @ self.bk.to(f64)
        return self.fold_norm_scale(wq, self.q_norm), self.fold_norm_scale(wk, self.k_norm)


def own_head_latents(x: torch.Tensor, h: int, tq: int, r: int) -> torch.Tensor:
    """Diagonal blocks of (B, H Tq, H r): row block h's own head's r columns -> (B, H, Tq, r)."""
    b = x.shape[0]
    return torch.diagonal(x.view(b, h, tq, h, r), dim1=1, dim2=3).permute(0, 3, 1, 2)
