"""Decode speed and KV-cache memory of every attention kind: one new token over a cache of T tokens.

    python bench/decode.py --tiny                                      # CPU, seconds
    python bench/decode.py --size 1b --context 2048,8192,32768 --save  # GPU, paper shapes
    python bench/decode.py --attention-only --size 128m --context 8192 --batch 1      # one layer, CPU
    python bench/decode.py --attention-only --size 1b --context 2048,8192,32768,131072 --batch 1,8,64 --save  # GPU

--attention-only: one attention layer of the preset (the kind's own module, its projections included),
one decode step of batch B over a cache of T random entries, per kind: ms, cache bytes read per step
(the filled cache), achieved GB/s (those bytes / time), ratio to MHA in the same process, and on CUDA
the share of the device's HBM bandwidth (--hbm-tb-s, else looked up from the GPU name). Variants:
`lrkv_decoupled` (model.residual_rope=false, a different model) and, on CUDA, `lrkv_torch` (exact LRKV
with decode_backend=torch; `lrkv` then uses the default, the Triton kernel). (context, batch) pairs whose
MHA cache would exceed --max-cache-gib are skipped.

Per kind and context: cache MiB (measured from the real cache), prefill ms, ms per decoded token
(median over --iters steps, batch --batch), and the speed-up over MHA in the same process.
LRKV decodes exactly by rebuilding each head's keys from the shared key and its latents chunk by
chunk (lrkv/attention/lrkv.py); its ideal memory-bound speed-up is 1/(1/H + r/d_h) (docs/design-notes.md §7).
MLA decodes with absorbed weights. --layers cuts the depth (same width) to fit long contexts.
"""

from __future__ import annotations

import sys

import torch

from lrkv import Transformer, load_model_config
from lrkv.attention import get_attention_class

try:
    from bench.common import add_ratios, parser, pick_device, print_table, record, sync, timed
except ImportError:
    from common import add_ratios, parser, pick_device, print_table, record, sync, timed

KINDS = ["mha", "gqa", "mqa", "mla", "lrkv"]
ATTENTION_KINDS = KINDS + ["lrkv_decoupled"]
VARIANTS = {"lrkv_decoupled": ("lrkv", {"residual_rope": False}), "lrkv_torch": ("lrkv", {"decode_backend": "torch"})}
HBM_TB_S = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "B200": 8.0, "L40S": 0.864, "A10": 0.6}  # by GPU name


def hbm_tb_s(device, given):
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_TB_S.items() if key in name), None)


def layer_config(name, args, context):
    kind, overrides = VARIANTS.get(name, (name, {}))
    return load_model_config(f"{kind}_{args.size}", max_seq_len=context + 1, n_layer=1, **overrides)


def bench_attention(name, context, batch, args, device, dtype) -> dict:
    """One decode step of one attention layer over `context` cached tokens (random cache entries)."""
    cfg = layer_config(name, args, context)
    torch.manual_seed(0)
    attn = get_attention_class(cfg.attention)(cfg, 0)
    with torch.no_grad():
        attn.reset_parameters()
    attn = attn.to(device=device, dtype=dtype).eval()
    cache = attn.new_cache(batch, context + 1, device, dtype)
    for buffer in cache.buffers.values():
        buffer.normal_()
    read = sum(b[:, :context].numel() * b.element_size() for b in cache.buffers.values())
    x = torch.randn(batch, 1, cfg.d_model, device=device, dtype=dtype)

    def step():
        cache.length = context
        attn(x, cache)

    with torch.no_grad():
        seconds = timed(step, device, warmup=args.warmup, iters=args.iters)
    row = {
        "kind": name,
        "context": context,
        "batch": batch,
        "ms": seconds * 1e3,
        "MB_read": read / 1e6,
        "GB_s": read / seconds / 1e9,
    }
    if args.hbm_tb_s:
        row["hbm_pct"] = 100 * row["GB_s"] / (args.hbm_tb_s * 1e3)
    return row


def attention_only(args, device, dtype) -> list[dict]:
    rows = []
    for context in (int(c) for c in args.context.split(",")):
        for batch in (int(b) for b in str(args.batch).split(",")):
            mha = layer_config("mha", args, context)
            if 2 * mha.n_head * mha.head_dim * context * batch * dtype.itemsize > args.max_cache_gib * 2**30:
                print(
                    f"skipped context {context} x batch {batch}: MHA cache above --max-cache-gib={args.max_cache_gib}"
                )
                continue
            group = [bench_attention(k, context, batch, args, device, dtype) for k in args.kinds.split(",")]
            add_ratios(group, speedup_vs_mha=("ms", False), bytes_vs_mha=("MB_read", True))
            rows += group
    return rows


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
    if args.hbm_tb_s:  # measured next to the bandwidth-bound ideal (weights + cache read once per step)
        from lrkv.evaluation.footprint import ideal_decode_step_s

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        step = ideal_decode_step_s(weights, args.batch, context, row["bytes_per_token"], args.hbm_tb_s * 1e12)
        row["ideal_ms_per_token"] = step * 1e3
    return row


def main(argv=None) -> dict:
    p = parser(__doc__, KINDS, iters=10, tiny_help="CPU smoke size: tiny presets, 2 layers, context 128")
    p.add_argument("--context", default=None, help="cached tokens, comma-separated (default 256,1024; 2048,8192)")
    p.add_argument("--batch", default="1", help="sequences per step (--attention-only: comma-separated list)")
    p.add_argument("--attention-only", action="store_true", help="one attention layer, one decode step, every kind")
    p.add_argument("--hbm-tb-s", type=float, default=None, help="HBM bandwidth for %% of peak (CUDA: from the name)")
    p.add_argument("--max-cache-gib", type=float, default=40.0, help="skip (context, batch) pairs above this MHA cache")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_only and "--kinds" not in (argv if argv is not None else sys.argv):
        args.kinds = ",".join(ATTENTION_KINDS)
    if args.tiny:
        args.size, args.layers, args.warmup, args.iters = "tiny", 2, 1, 3
        args.context = "128" if not args.attention_only else "256"
        args.batch = "1" if not args.attention_only else "1,2"
    args.context = args.context or ("2048,8192" if args.attention_only else "256,1024")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.hbm_tb_s = hbm_tb_s(device, args.hbm_tb_s)
    if args.attention_only:
        if device.type == "cuda" and "lrkv" in args.kinds.split(",") and "lrkv_torch" not in args.kinds:
            args.kinds += ",lrkv_torch"
        rows = attention_only(args, device, dtype)
        columns = ["kind", "context", "batch", "ms", "speedup_vs_mha", "MB_read", "bytes_vs_mha", "GB_s", "hbm_pct"]
        print_table(rows, columns)
        return record("decode_attention", device, rows, vars(args), args.save)
    args.batch = int(args.batch)
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
            "ideal_ms_per_token",
        ],
    )
    return record("decode", device, rows, vars(args), args.save)


if __name__ == "__main__":
    main()
