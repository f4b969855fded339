"""Training throughput of every attention kind: forward + backward + optimizer step, tokens/s and MFU.

    python bench/train_step.py --tiny                          # CPU, seconds: proves it runs
    python bench/train_step.py --size 1b --batch 8 --seq 2048 --compile --save   # GPU, paper shapes

Kinds: mha, gqa, mqa, mla, lrkv (factored: X.[W_shared|U] then batched .B^T) and lrkv_folded
(W_shared + U B^T formed each step, then one MHA-sized GEMM). Ratios are against MHA measured in the
same process. MFU = Transformer.flops_per_token(seq) x tokens/s / device bf16 peak (see lrkv/training/monitor.py).
--layers overrides the preset's depth (same width), to fit a quick run on one GPU.
"""

from __future__ import annotations

import contextlib

import torch

from lrkv import Transformer, load_model_config
from lrkv.training.monitor import device_peak_flops
from lrkv.training.optim import build_optimizer

try:
    from bench.common import add_ratios, parser, pick_device, print_table, record, timed
except ImportError:  # run as a script: python bench/train_step.py
    from common import add_ratios, parser, pick_device, print_table, record, timed

KINDS = ["mha", "gqa", "mqa", "mla", "lrkv", "lrkv_folded"]
OPTIM = dict(
    name="muon",
    matrix_lr=0.02,
    embed_lr=0.2,
    head_lr=0.004,
    scalar_lr=0.004,
    betas=[0.9, 0.95],
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.95,
)


def model_for(kind: str, size: str, layers: int | None, seq: int):
    name = "lrkv" if kind == "lrkv_folded" else kind
    overrides = {"max_seq_len": max(seq, 64)}
    if layers:
        overrides["n_layer"] = layers
    if kind == "lrkv_folded":
        overrides["lrkv_impl"] = "folded"
    return load_model_config(f"{name}_{size}", **overrides)


def bench_kind(kind, args, device) -> dict:
    cfg = model_for(kind, args.size, args.layers, args.seq)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizer = build_optimizer(model, OPTIM)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model.loss(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, warmup=args.warmup, iters=args.iters)
    tokens_per_s = args.batch * args.seq / seconds
    peak = device_peak_flops(device)
    row = {
        "kind": kind,
        "params_M": model.num_params() / 1e6,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "mfu": model.flops_per_token(args.seq) * tokens_per_s / peak if peak else None,
    }
    if device.type == "cuda":
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv=None) -> dict:
    p = parser(__doc__, KINDS, iters=5, tiny_help="CPU smoke size: tiny presets, 2 layers, batch 2 x 64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.layers, args.batch, args.seq, args.warmup, args.iters = "tiny", 2, 2, 64, 1, 2
    device = pick_device(args.device)
    rows = [bench_kind(kind, args, device) for kind in args.kinds.split(",")]
    add_ratios(rows, vs_mha=("tokens_per_s", True))
    print_table(
        rows,
        ["kind", "params_M", "ms_per_step", "tokens_per_s", "vs_mha", "mfu"]
        + (["peak_mem_GiB"] if device.type == "cuda" else []),
    )
    return record("train_step", device, rows, vars(args), args.save)


if __name__ == "__main__":
    main()
