"""Helpers for training tests: tiny-run overrides, in-process runs through Hydra's compose API, subprocess runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
)


def tiny_overrides(out: Path, cache: Path, model: str = "mha_tiny", steps: int = 6, **extra) -> list[str]:
    """A very small, fast run: 2 layers x 64 wide, 64-token sequences, BPE vocab 512 on the stdlib topics."""
    fields = {
        "model": model,
        "model.n_layer": 2,
        "model.d_model": 64,
        "model.head_dim": 16,
        "model.max_seq_len": 64,
        "data.source": "embedded:topics",
        "data.batch_size": 4,
        "data.val_batches": 2,
        "tokenizer.vocab_size": 512,
        "train.batch_tokens": 512,
        "train.max_steps": steps,
        "train.val_every": 3,
        "train.log_every": 1,
        "train.ckpt_every": 3,
        "train.progress_bar": "false",
        "optim.warmup_steps": 2,
        "callbacks": "none",
        "paths.output_dir": str(out),
        "paths.cache_dir": str(cache),
        "run_name": "run",
    }
    fields.update(extra)
    return [f"{key}={value}" for key, value in fields.items()]


def compose_train(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("callbacks", None)
    plain.pop("logger", None)
    return plain


def evaluate(out_dir, *overrides):
    """Compose configs/evaluate.yaml with overrides (as on the command line) and run the mode in-process."""
    from lrkv.evaluation.modes import run

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    return run(cfg, out_dir, echo=False)


def train_in_process(overrides: list[str], run_dir: Path, callbacks=None):
    from lrkv.training.run import train

    return train(compose_train(overrides), run_dir, extra_callbacks=callbacks or [])


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra)
    return env


def run_script(
    args: list[str], cwd: Path, timeout: int = 300, script: str = "train.py", **env
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train_loss"]) for r in read_rows(run_dir / "metrics.csv") if r["train_loss"]}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["val_loss"]) for r in read_rows(run_dir / "metrics.csv") if r["val_loss"]}
