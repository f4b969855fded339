"""StiefAttention vs EigenAttention on a tiny MHA model trained on the embedded corpus (CPU, minutes).

    python bench/compress_tiny.py [--steps 300] [--layers 2] [--epochs 10] [--init eigen|random]

Trains a small model (BPE 512 on pydoc topics), then measures, on held-out calibration sequences,
the relative error of each decoder block's output with keys and values projected at the same rank r,
for EigenAttention (SVD) bases and StiefAttention (learned) bases; then allocates ranks at a budget
with both allocators and reports the held-out loss. Numbers are printed as a table and JSON.
"""

import argparse
import json
import time

import numpy as np
import torch

from lrkv import ModelConfig, Transformer
from lrkv.compress import (
    StiefOptions,
    calibrate,
    eigen_bases,
    fit_compression,
    kv_statistics,
    layer_profile,
    rank_grid,
    stief_bases,
)
from lrkv.data import embedded_documents, encode_documents, pack_documents, train_bpe


def corpus_tokens(vocab: int = 512):
    docs = embedded_documents("topics")
    tok = train_bpe(docs, vocab)
    stream = torch.from_numpy(pack_documents(encode_documents(tok, docs), tok.eos_id, np.int64))
    return tok, stream


def train_tiny(
    stream, n_layer=2, d_model=64, n_head=4, head_dim=16, seq_len=64, steps=300, batch=16, lr=3e-3, seed=0, vocab=512
):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="mha_micro",
        attention="mha",
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        head_dim=head_dim,
        vocab_size=vocab,
        max_seq_len=seq_len,
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_train = int(0.9 * len(stream))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, n_train - seq_len - 1, (batch,), generator=g)
        rows = torch.stack([stream[s : s + seq_len + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = model.loss(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach()), stream[n_train:]


def main():
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and robust on a loaded machine
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n-seqs", type=int, default=48)
    p.add_argument("--init", default="eigen")
    p.add_argument("--budget", type=float, default=0.6)
    args = p.parse_args()
    t0 = time.time()
    tok, stream = corpus_tokens()
    model, train_loss, held = train_tiny(stream, n_layer=args.layers, steps=args.steps)
    print(f"trained {args.steps} steps in {time.time() - t0:.1f}s, last train loss {train_loss:.3f}")
    seq_len = model.cfg.max_seq_len
    rows = stream[: args.n_seqs * seq_len].view(args.n_seqs, seq_len)
    calib = calibrate(model, [rows], max_tokens=args.n_seqs * seq_len)
    n_eval = max(1, args.n_seqs // 6)
    grid = rank_grid(model.cfg.head_dim, [0.25, 0.5, 0.75])
    opts = StiefOptions(epochs=args.epochs, patience=3, batch_k=4, batch_v=4, init=args.init)
    results = []
    t1 = time.time()
    for layer, x, y in calib.layers():
        block = model.blocks[layer]
        n_fit = args.n_seqs - n_eval
        stats = kv_statistics(block, x[:n_fit])
        eig = eigen_bases(stats)
        learned = stief_bases(block, x[:n_fit], y[:n_fit], stats, eig, grid, grid, opts)
        e = layer_profile(block, x[n_fit:], y[n_fit:], eig, grid)["kv"]
        s = layer_profile(block, x[n_fit:], y[n_fit:], learned, grid)["kv"]
        for i, r in enumerate(grid):
            results.append(
                {
                    "layer": layer,
                    "rank": r,
                    "eigen": e["rel_error"][i],
                    "stief": s["rel_error"][i],
                    "eigen_cos": e["cosine"][i],
                    "stief_cos": s["cosine"][i],
                }
            )
    print(f"bases in {time.time() - t1:.1f}s")
    print("layer rank   eigen_err   stief_err   eigen_cos  stief_cos")
    for r in results:
        print(
            f"{r['layer']:5d} {r['rank']:4d}  {r['eigen']:.6f}   {r['stief']:.6f}   "
            f"{r['eigen_cos']:.6f}   {r['stief_cos']:.6f}"
        )
    held_rows = held[: (len(held) // seq_len) * seq_len][: 32 * seq_len].view(-1, seq_len)
    with torch.no_grad():
        source_loss = float(model.loss(held_rows[:, :-1], held_rows[:, 1:]))
    print(f"held-out loss of the source model: {source_loss:.4f}")
    stief = dict(epochs=args.epochs, patience=3, batch_k=4, batch_v=4, init=args.init)
    for method in ("eigen", "stief"):
        fit = fit_compression(
            model, [rows], method=method, budget=args.budget, rank_fractions=[0.25, 0.5, 0.75], stief=stief
        )
        for budget in sorted({0.5, args.budget, 0.75}):
            for allocator in ("pareto", "sequential"):
                c, rep = fit.compress(budget=budget, allocator=allocator)
                with torch.no_grad():
                    loss = float(c.loss(held_rows[:, :-1], held_rows[:, 1:]))
                print(
                    f"{method:5s} {allocator:10s} budget {budget:.2f}: kv_ratio {rep['kv_ratio']:.4f} "
                    f"k {rep['k_ranks']} v {rep['v_ranks']} held-out loss {loss:.4f} (+{loss - source_loss:.4f})"
                )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
