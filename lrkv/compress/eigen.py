"""EigenAttention (arXiv 2408.05646): SVD bases of calibration keys and values, threshold ranks.

Bases. With the calibration pre-RoPE keys of all G heads stacked as rows of K (n G x d_h) and each
head's values as V_g (n x d_h), the bases are their right singular vectors, ordered by singular
value s: the eigenvectors of K^T K and V_g^T V_g (no centring, as in the reference code). The rank-r
basis is the first r of them, so one decomposition serves every rank.

Ranks from a threshold tau (reference code): with shares s_i / sum_j s_j (singular values, not
squared), r(tau) = #{i : cumulative share_i < tau}; the value rank is the largest over the heads
(one rank per layer).

Per-layer search (reference code, Llama branch): tau = 1.0, 0.98, 0.96, ...; stop at the first tau
whose block output has relative error >= error_budget (0.025) or whose key or value rank is
<= 0.45 d_h, and use the previous tau (the code's "step back by 0.04" after its extra decrement).
If tau = 1.0 already fails, the layer keeps full rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lrkv.errors import ConfigError

from .layer import KVStats, block_error

log = logging.getLogger("lrkv")


@dataclass
class EigenOptions:
    error_budget: float = 0.025  # relative error of the block output allowed per layer
    min_rank_fraction: float = 0.45  # stop before a rank drops to this fraction of d_h
    step: float = 0.02  # threshold decrement
    start: float = 1.0  # first threshold

    def __post_init__(self):
        if not self.error_budget > 0:
            raise ConfigError(f"compress.eigen.error_budget must be > 0, got {self.error_budget}")
        if not 0 <= self.min_rank_fraction < 1:
            raise ConfigError(f"compress.eigen.min_rank_fraction must be in [0, 1), got {self.min_rank_fraction}")
        if not 0 < self.step < 1:
            raise ConfigError(f"compress.eigen.step must be in (0, 1), got {self.step}")


@dataclass
class EigenBases:
    """Ordered orthonormal bases of one layer: keys uk (d_h, d_h), values uv (G, d_h, d_h), singular values."""

    uk: torch.Tensor
    sk: torch.Tensor
    uv: torch.Tensor
    sv: torch.Tensor

    def key(self, r: int) -> torch.Tensor:
        return self.uk[:, :r]

    def value(self, r: int) -> torch.Tensor:
        return self.uv[:, :, :r]


def ordered_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and singular values sqrt(lambda) of a Gram matrix, largest first."""
    evals, evecs = torch.linalg.eigh(gram)
    return evecs.flip(-1), evals.flip(-1).clamp_min(0).sqrt()


def eigen_bases(stats: KVStats) -> EigenBases:
    """SVD bases of one layer from its Gram matrices (float32 result)."""
    uk, sk = ordered_eigh(stats.gram_k)
    uv, sv = ordered_eigh(stats.gram_v)
    return EigenBases(uk.float(), sk.float(), uv.float(), sv.float())


def threshold_rank(s: torch.Tensor, threshold: float) -> int:
    """#{i : cumsum(s / sum s)_i < threshold}, clamped to [1, len(s)]; s (d_h,) or (G, d_h): max over rows."""
    s = s.double()
    share = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    count = (share.cumsum(-1) < threshold).sum(-1)
    return int(min(max(int(count.max()), 1), s.shape[-1]))


def threshold_search(block, x, y, bases: EigenBases, options: EigenOptions, chunk_rows: int = 8) -> dict:
    """EigenAttention's per-layer search (module docstring); returns ranks, threshold and the trace."""
    dh = bases.uk.shape[0]
    min_rank = options.min_rank_fraction * dh
    trace, step = [], 0
    while True:
        tau = round(options.start - step * options.step, 10)
        rk, rv = threshold_rank(bases.sk, tau), threshold_rank(bases.sv, tau)
        err = block_error(block, x, y, bases.key(rk), bases.value(rv), chunk_rows)
        trace.append({"threshold": tau, "k_rank": rk, "v_rank": rv, "rel_error": err.rel_error})
        log.info(
            f"EigenAttention layer {getattr(block, 'layer', '?')}: threshold {tau:g} -> key rank {rk}, "
            f"value rank {rv}, relative error {err.rel_error:.4g} (budget {options.error_budget:g})"
        )
        if err.rel_error >= options.error_budget or rk <= min_rank or rv <= min_rank or tau <= options.step:
            break
        step += 1
    tau = round(trace[-1]["threshold"] + options.step, 10)  # the last threshold that passed
    rk, rv = threshold_rank(bases.sk, tau), threshold_rank(bases.sv, tau)
    return {"threshold": tau, "k_rank": rk, "v_rank": rv, "trace": trace}
