"""Optimizers and learning-rate schedules.

`MuonAdamW` is one torch Optimizer whose parameter groups each use either Muon (hidden matrices) or
AdamW (embedding, LM head, norm weights): the paper's split (docs/design-notes.md §4), as one optimizer so that
Lightning's automatic optimization, gradient clipping, checkpoints and schedules treat it like any
other.

Muon (Keller Jordan): momentum, then replace the update by the nearest semi-orthogonal matrix
(Newton-Schulz iteration on the whole matrix), scaled by sqrt(max(1, rows/cols)). Under FSDP each
rank holds only a row shard of every matrix, and orthogonalising a shard is a different optimizer
(docs/design-notes.md §9). Here a sharded (DTensor) update is gathered to the full matrix, orthogonalised, and
each rank keeps its own rows, so FSDP gives the single-process result (tested).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from lrkv.errors import ConfigError

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of g (quintic Newton-Schulz, Muon's coefficients).

    Works on batches (..., m, n). Runs in bfloat16 on CUDA (as Muon does) and float32 elsewhere.
    """
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if transposed else x).to(g.dtype)


def muon_update(update: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonalised update with Muon's shape scale; gathers and re-shards a DTensor."""
    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        ortho = distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    else:
        ortho = newton_schulz(update, steps)
    return ortho * math.sqrt(max(1.0, update.shape[-2] / update.shape[-1]))


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `use_muon=True` get Muon, the others AdamW (decoupled weight decay)."""

    def __init__(
        self,
        groups: list[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            use_muon=False,
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"] and group.get("momentum_warmup_steps"):  # saved with the groups: exact resume
                group["momentum"] = muon_momentum(group["muon_steps"], **_warmup_fields(group))
                group["muon_steps"] += 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(muon_update(update, group["ns_steps"]), alpha=-group["lr"])

    def _adamw(self, p, group):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def muon_momentum(step: int, *, start: float, final: float, warmup_steps: int) -> float:
    """Muon momentum at optimizer step `step` (0-based): linear from `start` to `final` over `warmup_steps`
    steps, then `final` (nanochat: 0.85 -> 0.95 over 300 steps); warmup_steps=0: always `final`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * final


def _warmup_fields(group: dict) -> dict:
    return dict(
        start=group["momentum_start"], final=group["momentum_final"], warmup_steps=group["momentum_warmup_steps"]
    )


def param_groups(
    model,
    *,
    matrix_lr: float,
    embed_lr: float,
    head_lr: float,
    scalar_lr: float,
    weight_decay: float,
    muon: bool,
    width_scale: bool,
    muon_weight_decay: float | None = None,
) -> list[dict]:
    """Split the Transformer's parameters: block matrices (Muon or AdamW), embedding, head, vectors.

    With `width_scale` the AdamW groups' learning rates are scaled by (d_model / 768)^-0.5 (nanochat).
    Weight decay applies to matrices only (block matrices, embedding and head), not to norm weights:
    `weight_decay` to the AdamW matrices, `muon_weight_decay` to the Muon group (None: `weight_decay`).
    """
    scale = (model.cfg.d_model / 768) ** -0.5 if width_scale else 1.0
    matrices, vectors = [], []
    for p in model.blocks.parameters():
        (matrices if p.dim() >= 2 else vectors).append(p)
    vectors += [p for name, p in model.named_parameters() if not name.startswith(("blocks.", "embed.", "lm_head."))]
    groups = [
        dict(
            params=matrices,
            lr=matrix_lr * (1.0 if muon else scale),
            use_muon=muon,
            weight_decay=weight_decay if muon_weight_decay is None or not muon else muon_weight_decay,
            name="matrix",
        ),
        dict(params=list(model.embed.parameters()), lr=embed_lr * scale, weight_decay=weight_decay, name="embed"),
    ]
    if model.lm_head is not None:
        groups.append(
            dict(params=list(model.lm_head.parameters()), lr=head_lr * scale, weight_decay=weight_decay, name="head")
        )
    if vectors:
        groups.append(dict(params=vectors, lr=scalar_lr * scale, weight_decay=0.0, name="vector"))
    return groups


def build_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    """Optimizer from the `optim` config: name adamw (all AdamW) or muon (Muon for block matrices)."""
    name = cfg.get("name")
    if name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name={name!r} is unknown; use optim=adamw or optim=muon")
    groups = param_groups(
        model,
        matrix_lr=cfg["matrix_lr"],
        embed_lr=cfg["embed_lr"],
        head_lr=cfg["head_lr"],
        scalar_lr=cfg["scalar_lr"],
        weight_decay=cfg["weight_decay"],
        muon=name == "muon",
        width_scale=cfg.get("width_scale", True),
        muon_weight_decay=cfg.get("muon_weight_decay"),
    )
    momentum = cfg.get("momentum", 0.95)
    warmup = cfg.get("momentum_warmup_steps") or 0
    if warmup < 0:
        raise ConfigError(f"optim.momentum_warmup_steps={warmup} must be >= 0 (0: no Muon momentum warmup)")
    for group in groups:
        if group.get("use_muon"):
            start = cfg.get("momentum_start", 0.85)
            group.update(momentum_start=start, momentum_final=momentum, momentum_warmup_steps=warmup, muon_steps=0)
            group["momentum"] = muon_momentum(0, start=start, final=momentum, warmup_steps=warmup)
    return MuonAdamW(
        groups,
        momentum=cfg.get("momentum", 0.95),
        betas=tuple(cfg["betas"]),
        eps=cfg["eps"],
        ns_steps=cfg.get("ns_steps", 5),
    )


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from 1 to min_lr_ratio at total_steps.
    wsd: linear warmup, constant, then linear decay to min_lr_ratio over the last decay_fraction of steps.
    constant: linear warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total_steps)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ConfigError(f"optim.schedule={schedule!r} is unknown; use cosine, wsd or constant")
