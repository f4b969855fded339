"""StiefAttention (arXiv 2601.21686): orthonormal bases learned to minimise the block output error.

For one layer and one rank r, a small MLP maps activation statistics to a square matrix whose QR
factor is an orthonormal basis (a point on the Stiefel manifold), truncated to r columns:

    s   = [mean_c ; var_c] / scale            per-channel statistics of the pre-RoPE keys (pooled
                                              over heads) or of one head's values, (n, 2 d_h)
    M   = M_0 + MLP(s)                        (n, d_h, d_h); n = 1 for keys, G for values (MLP shared)
    P   = Q[:, :r],   Q R = M                 orthonormal columns

trained with AdamW (lr 5e-3, cosine schedule) on the loss ||Y' - Y||_F / ||Y||_F of the whole
decoder block output (projected_block in layer.py) over minibatches of calibration sequences
(batch 1 for keys, 4 for values), for up to 50 epochs with early stopping (patience 5) on held-out
calibration sequences; the best basis seen is kept.

Choices where the paper is silent (documented here):
- The statistics are those of the whole calibration set, so the MLP acts as a reparametrisation of
  M conditioned on them.
- init="eigen" (default) starts at M_0 = the EigenAttention basis with the MLP's last layer zeroed,
  so training starts from the SVD solution and, with best-on-validation selection, never ends
  worse than it on the validation split. init="random" uses M_0 = 0 and a random MLP.
- Keys are trained with values unprojected and values with keys unprojected, so every rank of each
  profile is independent of the other component's rank; the allocator pairs them afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lrkv.errors import ConfigError

from .layer import projected_block

log = logging.getLogger("lrkv")


@dataclass
class StiefOptions:
    epochs: int = 50
    patience: int = 5  # epochs without a better validation loss before stopping
    lr: float = 5e-3
    weight_decay: float = 0.01
    batch_k: int = 1  # calibration sequences per step when training the key basis
    batch_v: int = 4  # ... the value bases
    hidden: int = 256  # MLP width
    init: str = "eigen"  # eigen | random
    val_fraction: float = 0.1  # calibration sequences held out for early stopping
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_k", "batch_v", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"compress.stief.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"compress.stief.patience must be a positive integer, got {self.patience!r}")
        if not self.lr > 0:
            raise ConfigError(f"compress.stief.lr must be > 0, got {self.lr}")
        if self.init not in ("eigen", "random"):
            raise ConfigError(f"compress.stief.init={self.init!r} is unknown; use eigen or random")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"compress.stief.val_fraction must be in (0, 1), got {self.val_fraction}")


class BasisNet(nn.Module):
    """Statistics (n, 2 d_h) -> M_0 + MLP(stats) (n, d_h, d_h) -> first r columns of Q from QR."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, m0: torch.Tensor, hidden: int, zero_last: bool):
        super().__init__()
        mean, var = mean.reshape(-1, mean.shape[-1]).float(), var.reshape(-1, var.shape[-1]).float()
        scale = var.mean(-1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("stats", torch.cat([mean / scale.sqrt(), var / scale], dim=-1))
        self.register_buffer("m0", m0.reshape(-1, *m0.shape[-2:]).float())
        dh = m0.shape[-1]
        self.mlp = nn.Sequential(nn.Linear(2 * dh, hidden), nn.GELU(), nn.Linear(hidden, dh * dh))
        if zero_last:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, rank: int) -> torch.Tensor:
        m = self.m0 + self.mlp(self.stats).view_as(self.m0)
        q, _ = torch.linalg.qr(m)
        return q[..., :rank]


class frozen:
    """Context: the model's parameters do not require gradients (restored on exit)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.model.parameters(), self.flags):
            p.requires_grad_(flag)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||out - ref||_F / ||ref||_F (differentiable)."""
    return (out - ref).float().norm() / ref.float().norm().clamp_min(1e-30)


def train_basis(block, x, y, which: str, rank: int, mean, var, m0, options: StiefOptions) -> tuple[torch.Tensor, dict]:
    """Learn the rank-`rank` key basis (which="k", (d_h, r)) or value bases ("v", (G, d_h, r)) of a block.

    x, y: calibration block inputs/outputs (N, T, d); the last val_fraction of the rows is held out
    for early stopping. Returns the basis and {"epochs", "init_val", "best_val"}.
    """
    n = x.shape[0]
    if n < 2:
        raise ConfigError(
            "StiefAttention needs at least 2 calibration sequences (training + validation); raise compress.calib.n_seqs"
        )
    n_val = min(max(1, round(options.val_fraction * n)), n - 1)
    x_tr, y_tr, x_val, y_val = x[: n - n_val], y[: n - n_val], x[n - n_val :], y[n - n_val :]
    zero_last = options.init == "eigen"
    with torch.random.fork_rng(devices=[]):  # seeded MLP init without touching the global RNG
        torch.manual_seed(options.seed)
        net = BasisNet(mean, var, m0 if zero_last else torch.zeros_like(m0), options.hidden, zero_last).to(x.device)
    batch = options.batch_k if which == "k" else options.batch_v
    steps = options.epochs * math.ceil(len(x_tr) / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.Generator().manual_seed(options.seed)

    def run(xs, basis):
        return projected_block(block, xs, basis if which == "k" else None, basis if which == "v" else None)

    def squeeze(basis):
        return basis[0] if which == "k" else basis

    @torch.no_grad()
    def val_loss() -> float:
        basis = squeeze(net(rank))
        return float(relative_error(torch.cat([run(xs, basis) for xs in x_val.split(batch)]), y_val))

    best = init_val = val_loss()
    best_state, bad, epochs = copy.deepcopy(net.state_dict()), 0, 0
    with frozen(block):
        for epoch in range(options.epochs):
            for idx in torch.randperm(len(x_tr), generator=order).split(batch):
                loss = relative_error(run(x_tr[idx], squeeze(net(rank))), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            epochs = epoch + 1
            current = val_loss()
            if current < best:
                best, best_state, bad = current, copy.deepcopy(net.state_dict()), 0
            else:
                bad += 1
                if bad >= options.patience:
                    break
    net.load_state_dict(best_state)
    with torch.no_grad():
        basis = squeeze(net(rank)).detach()
    return basis, {"epochs": epochs, "init_val": init_val, "best_val": best}


class LearnedBases:
    """Learned bases of one layer per rank: key(r) (d_h, r) and value(r) (G, d_h, r); full rank = identity."""

    def __init__(self, head_dim: int, kv_heads: int):
        self.head_dim, self.kv_heads = head_dim, kv_heads
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.info: dict[str, dict] = {}

    def key(self, r: int) -> torch.Tensor:
        if r == self.head_dim and r not in self.keys:
            return torch.eye(r)
        return self.keys[r]

    def value(self, r: int) -> torch.Tensor:
        if r == self.head_dim and r not in self.values:
            return torch.eye(r).expand(self.kv_heads, r, r).clone()
        return self.values[r]


def stief_bases(block, x, y, stats, eigen, k_ranks, v_ranks, options: StiefOptions) -> LearnedBases:
    """Train the key bases at k_ranks and the value bases at v_ranks of one layer (full rank is free).

    Logs one progress line per layer and rank (this is the slow part of compression)."""
    attn = block.attn
    bases = LearnedBases(attn.head_dim, attn.kv_heads)
    todo = [("k", r) for r in sorted(set(k_ranks)) if r < attn.head_dim]
    todo += [("v", r) for r in sorted(set(v_ranks)) if r < attn.head_dim]
    for i, (which, r) in enumerate(todo, 1):
        start = time.perf_counter()
        mean, var, m0 = (stats.mean_k, stats.var_k, eigen.uk) if which == "k" else (stats.mean_v, stats.var_v, eigen.uv)
        basis, info = train_basis(block, x, y, which, r, mean, var, m0, options)
        (bases.keys if which == "k" else bases.values)[r], bases.info[f"{which}{r}"] = basis, info
        log.info(
            f"StiefAttention layer {getattr(block, 'layer', '?')}: {'key' if which == 'k' else 'value'} rank {r} "
            f"({i}/{len(todo)}): {info['epochs']} epochs, held-out error {info['init_val']:.4g} -> "
            f"{info['best_val']:.4g} ({time.perf_counter() - start:.1f} s)"
        )
    return bases
