"""Decode speed and KV-cache memory of every attention kind: one new token over a cache of T tokens.

    python bench/decode.py --tiny                                      # CPU, seconds
    python bench/decode.py --size 1b --context 2048,8192,32768 --save  # GPU, paper shapes

Per kind and context: cache MiB (measured from the real cache), prefill ms, ms per decoded token
(median over --iters steps, batch --batch), and the speed-up over MHA in the same process.
LRKV decodes exactly by rebuilding each head's keys from the shared key and its latents chunk by
chunk (lrkv/attention/lrkv.py); its ideal memory-bound speed-up is 1/(1/H + r/d_h) (docs/design-notes.md §7).
MLA decodes with absorbed weights. --layers cuts the depth (same width) to fit long contexts.
"""

from __future__ import annotations

import torch

from lrkv import Transformer, load_model_config

try:
    from bench.common import add_ratios, parser, pick_device, print_table, record, sync, timed
except ImportError:
    from common import add_ratios, parser, pick_device, print_table, record, sync, timed

KINDS = ["mha", "gqa", "mqa", "mla", "lrkv"]


def bench(kind, context, args, device, dtype) -> dict:
    overrides = {"max_seq_len": context + args.iters + args.warmup + 1}
    if args.layers:
        overrides["n_layer"] = args.layers
    cfg = load_model_config(f"{kind}_{args.size}", **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, context), device=device)
    token = prompt[:, -1:]
    with torch.no_grad():
        cache = model.new_cache(args.batch, overrides["max_seq_len"], dtype=dtype)
        sync(device)
        import time

        start = time.perf_counter()
        model(prompt, cache)
        sync(device)
        prefill = time.perf_counter() - start
        seconds = timed(lambda: model(token, cache), device, warmup=args.warmup, iters=args.iters)
    row = {
        "kind": kind,
        "context": context,
        "cache_MiB": cache.nbytes() / 2**20,
        "bytes_per_token": cache.nbytes_per_token(),
        "prefill_ms": prefill * 1e3,
        "ms_per_token": seconds * 1e3,
    }
    if kind == "lrkv":
        row["ideal_speedup"] = 1 / (1 / cfg.n_head + cfg.rank / cfg.head_dim)
    return row


def main(argv=None) -> dict:
    p = parser(__doc__, KINDS, iters=10, tiny_help="CPU smoke size: tiny presets, 2 layers, context 128")
    p.add_argument("--context", default="256,1024")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.layers, args.context, args.warmup, args.iters = "tiny", 2, "128", 1, 3
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for context in (int(c) for c in args.context.split(",")):
        group = [bench(kind, context, args, device, dtype) for kind in args.kinds.split(",")]
        add_ratios(group, speedup_vs_mha=("ms_per_token", False), cache_vs_mha=("bytes_per_token", True))
        rows += group
    print_table(
        rows,
        [
            "kind",
            "context",
            "cache_MiB",
            "cache_vs_mha",
            "prefill_ms",
            "ms_per_token",
            "speedup_vs_mha",
            "ideal_speedup",
        ],
    )
    return record("decode", device, rows, vars(args), args.save)


if __name__ == "__main__":
    main()
