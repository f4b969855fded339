"""Fused flash-decoding kernel for exact LRKV (Triton): rebuild each head's keys on chip.

For query head h of sequence b at position s (one of the last Tq), over cached positions t < T:

    y_t     = k_s,t + R_K,h,t B_K,h                    (d_h: shared key plus the head's rank-r residual)
    k_t     = RoPE_t(norm(y_t))                        (QK-norm, then RoPE at the cached position t)
    a_t     = softmax_t(q_h . k_t)                      (q_h already normalised, rotated and scaled)
    out_h   = sum_t a_t v_s,t + (sum_t a_t R_V,h,t) B_V,h      (values by associativity)

Flash-decoding layout: the grid is (B·H·Tq, splits); each program walks its split of the cached length
in blocks of BLOCK_T positions, reads k_s, v_s (d_h) and its head's R_K, R_V (r) once per position,
rebuilds the keys in registers (a (BLOCK_T × r)·(r × d_h/2) dot per RoPE half, the norm, the rotation
with cos/sin of the position computed in the kernel), and keeps an online softmax in float32 (running
max m, normaliser l, attended v_s of d_h and attended R_V of r). A reduction in torch combines the
splits (weights exp(m_i − max m)) and applies B_V once. Programs of the H heads of one (b, split) are
adjacent in the grid, so k_s and v_s come from L2 after the first head reads them from HBM. Caches in
float32, bfloat16 or float16 (read as stored, computed in float32); any length (masked blocks).

`model.decode_backend=triton` selects it (auto: on CUDA when Triton imports); asking for it where it
cannot run (Triton missing, or a CPU without TRITON_INTERPRET=1) is a one-line ConfigError. The tests
run it on CPU under TRITON_INTERPRET=1 against the torch path (lrkv.py, attend_cached).
"""

import math
import os

import torch

try:  # optional: pip install triton (the dev extra)
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"

    class tl:  # noqa: N801 - stands in for triton.language so that the kernel's annotations evaluate
        constexpr = object


_KERNELS: dict[bool, object] = {}  # interpret mode -> jitted kernel (Triton decides at decoration time)


def triton_unavailable(device) -> str | None:
    """Why the Triton kernel cannot run on `device` (None when it can)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "triton is not installed (pip install triton)"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CUDA, or on a CPU only under TRITON_INTERPRET=1"
    return None


def _lrkv_decode_kernel(
    q_ptr, ks_ptr, vs_ptr, rk_ptr, rv_ptr, bk_ptr, w_ptr, freq_ptr,
    m_ptr, l_ptr, acc_s_ptr, acc_r_ptr,
    T, TQ, H, R, HALF, split_len, eps,
    s_qb, s_qt, s_qh,
    s_ksb, s_kst, s_vsb, s_vst,
    s_rkb, s_rkt, s_rkh, s_rvb, s_rvt, s_rvh,
    HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, HALF_P: tl.constexpr, R_P: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (b, h, tq) flattened, h fastest but one
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    tqi = row % TQ
    h = (row // TQ) % H
    b = row // (TQ * H)
    qpos = T - TQ + tqi
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    rr = tl.arange(0, R_P)
    rmask = rr < R
    q_base = q_ptr + b * s_qb + tqi * s_qt + h * s_qh
    q1 = tl.load(q_base + d, mask=dmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    b_base = bk_ptr + h * R * 2 * HALF + rr[:, None] * (2 * HALF) + d[None, :]
    bmask = rmask[:, None] & dmask[None, :]
    b1 = tl.load(b_base, mask=bmask, other=0.0).to(tl.float32)  # (R_P, HALF_P)
    b2 = tl.load(b_base + HALF, mask=bmask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    freq = tl.load(freq_ptr + d, mask=dmask, other=0.0)

    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc1 = tl.zeros((HALF_P,), tl.float32)
    acc2 = tl.zeros((HALF_P,), tl.float32)
    acc_r = tl.zeros((R_P,), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, qpos + 1)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        kmask = tmask[:, None] & dmask[None, :]
        ks_row = ks_ptr + b * s_ksb + t[:, None] * s_kst + d[None, :]
        y1 = tl.load(ks_row, mask=kmask, other=0.0).to(tl.float32)
        y2 = tl.load(ks_row + HALF, mask=kmask, other=0.0).to(tl.float32)
        rk = tl.load(
            rk_ptr + b * s_rkb + t[:, None] * s_rkt + h * s_rkh + rr[None, :],
            mask=tmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_T, R_P)
        y1 += tl.dot(rk, b1, input_precision="ieee")
        y2 += tl.dot(rk, b2, input_precision="ieee")
        if HAS_NORM:
            inv = tl.rsqrt((tl.sum(y1 * y1, 1) + tl.sum(y2 * y2, 1)) / (2 * HALF) + eps)
            y1 = y1 * inv[:, None] * w1[None, :]
            y2 = y2 * inv[:, None] * w2[None, :]
        angle = t[:, None].to(tl.float32) * freq[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        score = tl.sum((y1 * cos - y2 * sin) * q1[None, :], 1) + tl.sum((y2 * cos + y1 * sin) * q2[None, :], 1)
        score = tl.where(tmask, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        l = l * alpha + tl.sum(p, 0)
        vs_row = vs_ptr + b * s_vsb + t[:, None] * s_vst + d[None, :]
        v1 = tl.load(vs_row, mask=kmask, other=0.0).to(tl.float32)
        v2 = tl.load(vs_row + HALF, mask=kmask, other=0.0).to(tl.float32)
        rv = tl.load(
            rv_ptr + b * s_rvb + t[:, None] * s_rvt + h * s_rvh + rr[None, :],
            mask=tmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, 0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, 0)
        acc_r = acc_r * alpha + tl.sum(p[:, None] * rv, 0)
        m = m_new
    out = row * nsplit + split
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_s_ptr + out * 2 * HALF + d, acc1, mask=dmask)
    tl.store(acc_s_ptr + out * 2 * HALF + HALF + d, acc2, mask=dmask)
    tl.store(acc_r_ptr + out * R + rr, acc_r, mask=rmask)


def _kernel():
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _KERNELS:
        import triton

        _KERNELS[interpret] = triton.jit(_lrkv_decode_kernel)
    return _KERNELS[interpret]


def _next_pow2(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def lrkv_decode(q: torch.Tensor, kv: dict[str, torch.Tensor], attn):
    """Exact LRKV attention of q (B, Tq, H, d_h) (normalised, rotated) over the cache views in kv -> (B, Tq, H, d_h).

    The last Tq cached positions are the queries' own (causal mask bottom-right); `attn` is the
    LowRankKVAttention layer (B_K, B_V, the key norm, RoPE theta, and the launch shape: `triton_block_t`
    cached positions per block, about `triton_programs` programs in the grid).
    """
    from triton import cdiv

    k_s, v_s, r_k, r_v = (kv[name] for name in ("k_s", "v_s", "r_k", "r_v"))
    b, tq, h, dh = q.shape
    t, r, half = k_s.shape[1], attn.rank, dh // 2
    for name, x in (("k_s", k_s), ("v_s", v_s), ("r_k", r_k), ("r_v", r_v)):
        if x.stride(-1) != 1:
            raise ValueError(f"cache buffer {name} must have a unit last stride for the Triton kernel")
    qs = (q.float() * (1.0 / math.sqrt(dh))).contiguous()
    bk = attn.bk.detach().float().contiguous()
    norm = attn.k_norm
    has_norm = not isinstance(norm, torch.nn.Identity)
    weight = getattr(norm, "weight", None)
    weight = torch.ones(dh, device=q.device) if weight is None else weight.detach().float().contiguous()
    eps = float(getattr(norm, "eps", 0.0))
    freq = (attn.cfg.rope_theta ** (-torch.arange(0, dh, 2, device=q.device, dtype=torch.float32) / dh)).contiguous()
    rows, block_t, programs = b * h * tq, attn.triton_block_t, attn.triton_programs
    nsplit = max(1, min(cdiv(programs, rows), cdiv(t, block_t)))
    split_len = cdiv(cdiv(t, nsplit), block_t) * block_t
    nsplit = cdiv(t, split_len)
    opts = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(rows, nsplit, **opts)
    l = torch.empty(rows, nsplit, **opts)
    acc_s = torch.empty(rows, nsplit, dh, **opts)
    acc_r = torch.empty(rows, nsplit, max(r, 1), **opts)
    _kernel()[(rows, nsplit)](
        qs, k_s, v_s, r_k, r_v, bk, weight, freq,
        m, l, acc_s, acc_r,
        t, tq, h, r, half, split_len, eps,
        qs.stride(0), qs.stride(1), qs.stride(2),
        k_s.stride(0), k_s.stride(1), v_s.stride(0), v_s.stride(1),
        r_k.stride(0), r_k.stride(1), r_k.stride(2), r_v.stride(0), r_v.stride(1), r_v.stride(2),
        HAS_NORM=has_norm, BLOCK_T=block_t, HALF_P=_next_pow2(half), R_P=_next_pow2(r),
    )  # fmt: skip
    # reduction over splits (a split past a query's position holds m = -inf, l = 0)
    top = m.amax(1, keepdim=True)
    weights = torch.exp(m - top).nan_to_num_(0.0)  # (rows, nsplit)
    total = (weights * l).sum(1)
    out_s = (weights[..., None] * acc_s).sum(1)
    out_r = (weights[..., None] * acc_r[..., :r]).sum(1)  # (rows, r)
    out_s = out_s.view(b, h, tq, dh)
    out_r = out_r.view(b, h, tq, r)
    out = (out_s + out_r @ attn.bv.detach().float()) / total.view(b, h, tq, 1)
    return out.transpose(1, 2).to(q.dtype)
