"""What an export reads: the model and tokenizer of a checkpoint, and what its run folder recorded.

This is the only module of `lrkv.export` that touches the loaders (any checkpoint `python evaluate.py ckpt=...`
accepts: run folder, pretrained/ folder, Lightning .ckpt, sharded FSDP folder, Hugging Face Llama folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrkv.io import find_run_dir, load_pretrained, metric_columns, read_metrics, read_summary


@dataclass
class Source:
    model: object  # lrkv.Transformer, float32, eval mode
    tokenizer: object | None  # lrkv.data.Tokenizer
    path: Path  # the folder or file the weights came from
    run: dict = field(default_factory=dict)  # training facts: tokens, steps, final losses (when recorded)


def load_source(ckpt: str | Path) -> Source:
    """The model (float32, CPU) and tokenizer of `ckpt`, plus the run's recorded training facts."""
    pretrained = load_pretrained(ckpt, device="cpu", dtype=torch.float32)
    return Source(pretrained.model, pretrained.tokenizer, Path(pretrained.path), run_facts(ckpt))


def run_facts(ckpt: str | Path) -> dict:
    """tokens, steps, final_train_loss, final_val_loss, final_val_bpb from summary.json (else metrics.csv)."""
    run_dir = find_run_dir(ckpt)
    if run_dir is None:
        return {}
    metrics_file = run_dir / "metrics.csv"
    metrics = metric_columns(read_metrics(metrics_file)) if metrics_file.exists() else {}
    summary = read_summary(run_dir)
    facts = {"run_dir": str(run_dir)}
    sources = {"tokens": "tokens", "steps": "step", "final_train_loss": "train_loss"}
    sources.update(final_val_loss="val_loss", final_val_bpb="val_bpb")
    for key, column in sources.items():
        value = summary.get(key)
        if value is None:
            logged = [v for v in metrics.get(column, []) if v is not None]
            value = logged[-1] if logged else None
        if value is not None:
            facts[key] = value
    return facts
