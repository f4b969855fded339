"""Muon under FSDP: owner-based orthogonalisation vs gathering every matrix on every rank.

    python bench/muon_dist.py                       # 2 CPU processes (gloo), lrkv_tiny at 4 layers x 256, --save
    python bench/muon_dist.py --kind mha --size 128m --layers 2 --procs 2

Builds the model sharded with FSDP2 (`fully_shard` per block, as training does), gives every parameter
the same seeded gradient, and times optimizer steps (median) with `muon_dist="gather"` (every rank
all-gathers every matrix update and runs Newton-Schulz on all of them) and `muon_dist="owner"` (each
matrix orthogonalised once, by its owner rank; lrkv/training/optim.py). It reports the bytes each rank
received for Muon per step, checks that both schemes and single-process Muon give the same parameters,
and projects the Newton-Schulz FLOPs per GPU of a large preset (default 6b3 on 8 GPUs) from its shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrkv import Transformer, load_model_config
from lrkv.training.optim import MuonAdamW, assign_owners, newton_schulz_flops, param_groups, shard_rows

try:
    from bench.common import print_table, record
except ImportError:  # run as a script
    from common import print_table, record


def model_config(args):
    overrides = {"n_layer": args.layers} if args.layers else {}
    if args.d_model:
        overrides.update(d_model=args.d_model, head_dim=args.d_model // 4 if args.kind != "lrkv" else 64, n_head=4)
    return load_model_config(f"{args.kind}_{args.size}", **overrides)


def make_optimizer(model, muon_dist: str) -> MuonAdamW:
    groups = param_groups(
        model,
        matrix_lr=0.02,
        embed_lr=0.2,
        head_lr=0.004,
        scalar_lr=0.004,
        weight_decay=0.1,
        muon=True,
        width_scale=True,
    )
    return MuonAdamW(groups, muon_dist=muon_dist)


def full_grads(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in model.named_parameters()}


def set_grads(model, grads) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for n, p in model.named_parameters():
        g = grads[n].to(p.dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lrkv.training.module import build_model

    mesh = init_device_mesh("cpu", (world,))
    cfg = model_config(args)
    result = {}
    params = {}
    for scheme in ("gather", "owner"):
        model = build_model(cfg, seed=0, mesh=mesh)
        opt = make_optimizer(model, scheme)
        times, comm = [], []
        for step in range(args.warmup + args.iters):
            set_grads(model, full_grads(model, seed=step))
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            dist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                comm.append(opt.comm_bytes)
        result[scheme] = {"ms_per_step": statistics.median(times) * 1e3, "muon_bytes_per_rank": max(comm)}
        params[scheme] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    if rank == 0:  # single-process Muon on the same gradients
        model = build_model(cfg, seed=0)
        opt = make_optimizer(model, "owner")
        for step in range(args.warmup + args.iters):
            set_grads(model, full_grads(model, seed=step))
            opt.step()
        single = dict(model.named_parameters())
        result["max_abs_diff_owner_vs_gather"] = max(
            float((params["owner"][n] - params["gather"][n]).abs().max()) for n in single
        )
        result["max_abs_diff_owner_vs_single"] = max(
            float((params["owner"][n] - single[n].detach()).abs().max()) for n in single
        )
        queue.put(result)
    dist.destroy_process_group()


def projected_ns_flops(kind: str, size: str, gpus: int, steps: int = 5) -> dict:
    """Per optimizer step and GPU for a preset under FSDP on `gpus` GPUs: Newton-Schulz FLOPs (gather: every
    matrix on every rank; owner: the busiest rank's share) and bytes received for Muon (gather: fp32 updates
    all-gathered; owner: bf16 shards to owners and result rows back, as on CUDA), from the shapes."""
    with torch.device("meta"):
        model = Transformer(load_model_config(f"{kind}_{size}"))
    shapes = [tuple(p.shape) for p in model.blocks.parameters() if p.dim() >= 2]
    flops = [newton_schulz_flops(s, steps) for s in shapes]
    owners = assign_owners(shapes, gpus, steps)
    load, owner_bytes, gather_bytes = [0] * gpus, [0] * gpus, [0] * gpus
    for shape, f, owner in zip(shapes, flops, owners):
        load[owner] += f
        rows, inner = shard_rows(shape[0], gpus), math.prod(shape[1:])
        for r in range(gpus):
            gather_bytes[r] += (shape[0] - rows[r]) * inner * 4
            owner_bytes[r] += ((shape[0] - rows[r]) if r == owner else rows[r]) * inner * 2
    return {
        "preset": f"{kind}_{size}",
        "gpus": gpus,
        "matrices": len(shapes),
        "ns_flops_per_gpu_gather": sum(flops),
        "ns_flops_per_gpu_owner_max": max(load),
        "ns_flops_per_gpu_owner_min": min(load),
        "reduction": sum(flops) / max(load),
        "muon_GiB_per_gpu_gather": max(gather_bytes) / 2**30,
        "muon_GiB_per_gpu_owner": max(owner_bytes) / 2**30,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="lrkv")
    p.add_argument("--size", default="tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256, help="override the width (0: the preset's)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--project", default="mha_6b3,lrkv_6b3", help="presets whose Newton-Schulz FLOPs are projected")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--save", action="store_true")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.procs, free_port(), args, queue), nprocs=args.procs, start_method="spawn")
    measured = queue.get()
    cfg = model_config(args)
    rows = [
        {
            "scheme": s,
            **measured[s],
            "speedup_vs_gather": measured["gather"]["ms_per_step"] / measured[s]["ms_per_step"],
        }
        for s in ("gather", "owner")
    ]
    print(f"{cfg.name} at {cfg.n_layer} layers x {cfg.d_model}, {args.procs} gloo processes, optimizer step only")
    print_table(rows, ["scheme", "ms_per_step", "speedup_vs_gather", "muon_bytes_per_rank"])
    print(
        f"max |owner - gather| = {measured['max_abs_diff_owner_vs_gather']:.3g}, "
        f"max |owner - single process| = {measured['max_abs_diff_owner_vs_single']:.3g}"
    )
    projections = []
    for preset in filter(None, args.project.split(",")):
        kind, size = preset.split("_", 1)
        projections.append(projected_ns_flops(kind, size, args.gpus))
    if projections:
        print(f"\nprojected Newton-Schulz FLOPs per optimizer step and GPU ({args.gpus} GPUs):")
        print_table(
            projections,
            ["preset", "matrices", "ns_flops_per_gpu_gather", "ns_flops_per_gpu_owner_max", "reduction"]
            + ["muon_GiB_per_gpu_gather", "muon_GiB_per_gpu_owner"],
        )
    settings = {**vars(args), "model": cfg.name, "n_layer": cfg.n_layer, "d_model": cfg.d_model}
    equality = {k: v for k, v in measured.items() if k.startswith("max_")}
    result = record("muon_dist", torch.device("cpu"), rows, settings, args.save, projections=projections, **equality)
    return result


if __name__ == "__main__":
    main()
