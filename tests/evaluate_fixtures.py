"""Tiny trained runs for the evaluation tests (imported by tests/test_evaluate*.py).

`tiny_runs(base)` trains small MHA and LRKV models (2 layers, d=64, a few seconds each):
160 AdamW steps each on the embedded corpus (pydoc topics) tokenized by a 512-id byte-level BPE,
and writes run folders in the training side's format (.hydra/config.yaml, pretrained/, metrics.csv,
summary.json) from the losses really logged. Built once per process (lru_cache), so session
the `runs` fixture (tests/conftest.py) shares it across modules. To be replaced by real `train.py` runs later.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from pathlib import Path

import torch
import yaml

from lrkv import ModelConfig, Transformer
from lrkv.data import BatchLoader, CorpusSpec, InMemoryTokens, iter_documents, token_byte_lengths, train_bpe
from lrkv.training.checkpoint import save_pretrained

DATA_CFG = {
    "source": "embedded:topics",
    "val_fraction": 0.1,
    "split_seed": 0,
    "seq_len": 64,
    "batch_size": 8,
    "val_batch_size": 8,
    "val_max_tokens": 3000,
    "tokenizer": "bpe",
    "vocab_size": 512,
}
# tests/helpers.tiny_config's shape with a 512-id vocabulary: ~20 ms per step on one CPU thread
SHAPE = dict(n_layer=2, n_head=4, d_model=64, head_dim=16, vocab_size=512, max_seq_len=128)
KINDS = {"mha": {}, "lrkv": {"rank": 4}}
STEPS, LOG_EVERY, VAL_EVERY, LR = 160, 10, 40, 5e-3
METRIC_COLUMNS = [
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_mem_gib",
]


def corpus_spec() -> CorpusSpec:
    return CorpusSpec(
        source=DATA_CFG["source"], val_fraction=DATA_CFG["val_fraction"], split_seed=DATA_CFG["split_seed"]
    )


@functools.cache
def tokenizer():
    return train_bpe(iter_documents(corpus_spec(), "train"), DATA_CFG["vocab_size"])


@torch.no_grad()
def direct_val(model, loader) -> tuple[float, float]:
    nats, n, nbytes = 0.0, 0, 0
    for batch in loader:
        nats += model.loss(batch["input"], batch["target"], reduction="sum").item()
        n += batch["target"].numel()
        nbytes += int(batch["bytes"].sum())
    return nats / n, nats / (math.log(2) * nbytes)


def train_run(run_dir: Path, kind: str, tok, train_loader, val_loader) -> Path:
    cfg = ModelConfig(name=f"{kind}_test", attention=kind, **SHAPE, **KINDS[kind])
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    rows, it, start = [], iter(train_loader), time.perf_counter()
    tokens_per_step = DATA_CFG["batch_size"] * DATA_CFG["seq_len"]
    for step in range(1, STEPS + 1):
        batch = next(it)
        model.train()
        loss = model.loss(batch["input"], batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        row = {"step": step, "tokens": step * tokens_per_step}
        if step % LOG_EVERY == 0:
            row.update(
                train_loss=loss.item(),
                lr=LR,
                grad_norm=grad_norm,
                tokens_per_s=step * tokens_per_step / (time.perf_counter() - start),
            )
        if step % VAL_EVERY == 0:
            model.eval()
            row["val_loss"], row["val_bpb"] = direct_val(model, val_loader)
        if len(row) > 2:
            rows.append(row)
    model.eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"model": cfg.to_dict(), "data": DATA_CFG, "seed": 0})
    )
    save_pretrained(model, run_dir / "pretrained", tok)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRIC_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in METRIC_COLUMNS])
    last_train = [r["train_loss"] for r in rows if "train_loss" in r][-1]
    last_val = [r for r in rows if "val_loss" in r][-1]
    summary = {
        "name": f"{kind}-tiny",
        "model": cfg.name,
        "attention": cfg.attention,
        "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "kv_bytes_per_token": cfg.kv_cache_bytes_per_token(),
        "steps": STEPS,
        "tokens": STEPS * tokens_per_step,
        "final_train_loss": last_train,
        "final_val_loss": last_val["val_loss"],
        "final_val_bpb": last_val["val_bpb"],
        "tokens_per_s": STEPS * tokens_per_step / (time.perf_counter() - start),
        "wall_time_s": time.perf_counter() - start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


@functools.cache
def tiny_runs(base: str) -> dict[str, Path]:
    """{"mha": RUN_DIR, "lrkv": RUN_DIR} under base/ (a multirun-style folder: base/0, base/1)."""
    tok = tokenizer()
    token_bytes = token_byte_lengths(tok)
    spec = corpus_spec()
    train = InMemoryTokens.from_texts(iter_documents(spec, "train"), tok, shuffle_documents=True, seed=0)
    val = InMemoryTokens.from_texts(iter_documents(spec, "val"), tok, max_tokens=DATA_CFG["val_max_tokens"])
    train_loader = BatchLoader(
        train,
        seq_len=DATA_CFG["seq_len"],
        batch_size=DATA_CFG["batch_size"],
        seed=0,
        shuffle=True,
        infinite=True,
        token_bytes=token_bytes,
    )
    val_loader = BatchLoader(
        val,
        seq_len=DATA_CFG["seq_len"],
        batch_size=DATA_CFG["val_batch_size"],
        shuffle=False,
        infinite=False,
        token_bytes=token_bytes,
    )
    root, threads = Path(base), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and leaves the other core free
    try:
        return {kind: train_run(root / str(i), kind, tok, train_loader, val_loader) for i, kind in enumerate(KINDS)}
    finally:
        torch.set_num_threads(threads)
