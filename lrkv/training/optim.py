"""Optimizers and learning-rate schedules.

`MuonAdamW` is one torch Optimizer whose parameter groups each use either Muon (hidden matrices) or
AdamW (embedding, LM head, norm weights): the paper's split (docs/design-notes.md §4), as one optimizer so that
Lightning's automatic optimization, gradient clipping, checkpoints and schedules treat it like any
other.

Muon (Keller Jordan): momentum, then replace the update by the nearest semi-orthogonal matrix
(Newton-Schulz iteration on the whole matrix), scaled by sqrt(max(1, rows/cols)). Under FSDP each
rank holds only a row shard of every matrix, and orthogonalising a shard is a different optimizer
(docs/design-notes.md §9). So whole matrices are orthogonalised, without redundant work
(`muon_dist="owner"`, the default): every matrix has one owner rank (greedy by Newton-Schulz FLOPs,
`assign_owners`); one all-to-all brings each owner the row shards of its matrices, the owner
orthogonalises them, and a second all-to-all sends every rank its rows of the results. Each rank
runs 1/N of the Newton-Schulz FLOPs and receives about 2 (N-1)/N^2 of the matrices' bytes per step,
instead of all of them (`muon_dist="gather"`: every rank gathers every matrix and orthogonalises it,
the simple scheme kept for comparison, bench/muon_dist.py). Both give the single-process result
(tested). Newton-Schulz runs in bfloat16 on CUDA (as the Muon reference does) and float32 on CPU; the
all-to-alls carry that dtype, so the owner scheme's numbers equal the single-process ones.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lrkv.errors import ConfigError

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device) -> torch.dtype:
    """Newton-Schulz compute dtype: bfloat16 on CUDA (the Muon reference), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of g (quintic Newton-Schulz, Muon's coefficients).

    Works on batches (..., m, n). Runs in `ns_dtype` (bfloat16 on CUDA, float32 elsewhere).
    """
    a, b, c = NS_COEFFS
    x = g.to(ns_dtype(g.device))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if transposed else x).to(g.dtype)


def newton_schulz_flops(shape, steps: int = 5) -> int:
    """FLOPs of `newton_schulz` on a (..., m, n) tensor: steps x (4 m^2 n + 2 m^3) per matrix, m = min(m, n)."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return math.prod(batch) * steps * (4 * m * m * n + 2 * m**3)


def muon_scale(shape) -> float:
    """Muon's shape scale sqrt(max(1, rows / cols))."""
    return math.sqrt(max(1.0, shape[-2] / shape[-1]))


def muon_update(update: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonalised update with Muon's shape scale; a DTensor is gathered on this rank and re-sharded."""
    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        ortho = distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    else:
        ortho = newton_schulz(update, steps)
    return ortho * muon_scale(update.shape)


def assign_owners(shapes, world: int, steps: int = 5) -> list[int]:
    """Owner rank of each matrix: largest Newton-Schulz cost first, each to the least loaded rank (ties: lowest)."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -newton_schulz_flops(shapes[i], steps)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += newton_schulz_flops(shapes[i], steps)
    return owners


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of dim 0 held by each rank under Shard(0) (torch.chunk: ceil(rows / world) each, the last ones fewer)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def is_row_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def owner_orthogonalise(updates: list[DTensor], steps: int) -> tuple[list[torch.Tensor], int]:
    """Muon updates of row-sharded matrices (one mesh), each orthogonalised once, on its owner rank.

    Returns this rank's rows of every scaled, orthogonalised update (local tensors) and the bytes this
    rank received from other ranks. Two all-to-alls: shards to owners, result rows back.
    """
    group = updates[0].device_mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = [u.to_local() for u in updates]
    device, dtype = local[0].device, ns_dtype(local[0].device)
    shapes = [tuple(u.shape) for u in updates]
    owners = assign_owners(shapes, world, steps)
    rows = [shard_rows(s[0], world) for s in shapes]
    inner = [math.prod(s[1:]) for s in shapes]
    mine = [i for i, o in enumerate(owners) if o == rank]
    by_owner = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    for i, t in enumerate(local):
        if t.shape[0] != rows[i][rank]:
            raise RuntimeError(f"matrix {shapes[i]}: rank {rank} holds {t.shape[0]} rows, expected {rows[i][rank]}")

    # 1. every rank sends each owner its rows of the owner's matrices (matrix order), receives its own matrices' rows
    send = [local[i].reshape(-1).to(dtype) for r in range(world) for i in by_owner[r]]
    send_splits = [sum(rows[i][rank] * inner[i] for i in by_owner[r]) for r in range(world)]
    recv_splits = [sum(rows[i][r] * inner[i] for i in mine) for r in range(world)]
    recv = _all_to_all(send, send_splits, recv_splits, group, device, dtype)
    parts = list(torch.split(recv, recv_splits))
    pieces: dict[int, list[torch.Tensor]] = {i: [] for i in mine}
    for r in range(world):
        for i, piece in zip(mine, torch.split(parts[r], [rows[i][r] * inner[i] for i in mine])):
            pieces[i].append(piece.view(rows[i][r], *shapes[i][1:]))

    # 2. the owner orthogonalises whole matrices and sends every rank its rows of the results
    ortho = {i: newton_schulz(torch.cat(pieces[i]), steps) for i in mine}
    back = [ortho[i][sum(rows[i][:r]) : sum(rows[i][: r + 1])].reshape(-1) for r in range(world) for i in mine]
    result = _all_to_all(back, recv_splits, send_splits, group, device, dtype)
    out: list[torch.Tensor] = [None] * len(updates)
    for r, part in enumerate(torch.split(result, send_splits)):
        for i, piece in zip(by_owner[r], torch.split(part, [rows[i][rank] * inner[i] for i in by_owner[r]])):
            out[i] = piece.view(local[i].shape).to(local[i].dtype) * muon_scale(shapes[i])
    itemsize = torch.empty((), dtype=dtype).element_size()
    received = (sum(recv_splits) - recv_splits[rank] + sum(send_splits) - send_splits[rank]) * itemsize
    return out, received


def _all_to_all(chunks, send_splits, recv_splits, group, device, dtype) -> torch.Tensor:
    send = torch.cat(chunks) if chunks else torch.empty(0, device=device, dtype=dtype)
    recv = torch.empty(sum(recv_splits), device=device, dtype=dtype)
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv


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
        muon_dist: str = "owner",
    ):
        if muon_dist not in ("owner", "gather"):
            raise ConfigError(f"muon_dist={muon_dist!r} is unknown; use owner or gather")
        self.muon_dist = muon_dist
        self.comm_bytes = 0  # bytes this rank received for Muon in the last step (sharded matrices only)
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
        self.comm_bytes = 0
        for group in self.param_groups:
            if group["use_muon"] and group.get("momentum_warmup_steps"):  # saved with the groups: exact resume
                group["momentum"] = muon_momentum(group["muon_steps"], **_warmup_fields(group))
                group["muon_steps"] += 1
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    self._adamw(p, group)
        return loss

    def _muon(self, params, group):
        sharded = []
        for p in params:
            update = self._momentum(p, group)
            if self.muon_dist == "owner" and is_row_sharded(update):
                sharded.append((p, update))
                continue
            if isinstance(update, DTensor):
                self.comm_bytes += (update.numel() - update.to_local().numel()) * update.element_size()
            self._apply(p, muon_update(update, group["ns_steps"]), group)
        meshes = {}
        for p, update in sharded:  # one owner exchange per device mesh (FSDP: one)
            meshes.setdefault(id(update.device_mesh), []).append((p, update))
        for pairs in meshes.values():
            ortho, received = owner_orthogonalise([u for _, u in pairs], group["ns_steps"])
            self.comm_bytes += received
            for (p, update), local in zip(pairs, ortho):
                self._apply(
                    p,
                    DTensor.from_local(
                        local,
                        update.device_mesh,
                        update.placements,
                        run_check=False,
                        shape=update.shape,
                        stride=update.stride(),
                    ),
                    group,
                )

    def _momentum(self, p, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _apply(p, ortho, group):
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(ortho, alpha=-group["lr"])

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
        muon_dist=cfg.get("muon_dist", "owner"),
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
