"""Reading what training leaves behind: checkpoints, run folders, their config, metrics and summary.

A training run folder (the Hydra output folder of `train.py`):

    RUN_DIR/.hydra/config.yaml   composed training config (model, data, seed, ...)
    RUN_DIR/pretrained/          model_config.json, model.safetensors, tokenizer.json
    RUN_DIR/checkpoints/         Lightning checkpoints (files, or folders when sharded under FSDP)
    RUN_DIR/metrics.csv          step,tokens,train_loss,val_loss,val_bpb,lr,... (empty cell = not logged)
    RUN_DIR/summary.json         name, model, attention, params, kv_bytes_per_token, final losses, ...

A multirun folder holds numbered run folders 0/, 1/, ... . Every reader here raises a one-line
`LrkvError` for a missing or unreadable path.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import torch

from lrkv.errors import CheckpointError, ConfigError, DataError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
RUN_MARKERS = ("metrics.csv", "summary.json", "config.yaml", ".hydra/config.yaml")


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None or name == "":
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"dtype {name!r} is unknown; use float32, bfloat16 or float16")
    return DTYPES[key]


# ---- checkpoints --------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """`load_pretrained` (pretrained folder, run folder, Lightning .ckpt, sharded FSDP folder or local
    Hugging Face Llama folder) with one-line errors. Returns `Pretrained(model, tokenizer, path)`; the model is in eval mode."""
    from lrkv.training.checkpoint import find_pretrained_folder, is_hf_llama_folder, load_pretrained

    if path is None or str(path) == "":
        raise ConfigError("this mode needs a checkpoint: pass ckpt=RUN_DIR (or a pretrained folder or checkpoint file)")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path {path} does not exist; pass a run folder, a pretrained folder or a checkpoint file"
        )
    known = find_pretrained_folder(path) or _looks_like_training_checkpoint(path) or is_hf_llama_folder(path)
    if path.is_dir() and not known:
        raise CheckpointError(
            f"{path} holds no model: expected model_config.json + model.safetensors, a pretrained/ folder, "
            "Lightning checkpoints under checkpoints/, or a Hugging Face Llama folder"
        )
    return load_pretrained(path, device=device, dtype=parse_dtype(dtype) if dtype is not None else None)


def _looks_like_training_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint folder (sharded: torch.distributed.checkpoint writes .metadata) or a run
    folder with checkpoints/."""
    return (
        (path / ".metadata").is_file()
        or (path / "meta.pt").is_file()
        or (path / "checkpoints").is_dir()
        or any(path.glob("*.ckpt"))
    )


def require_tokenizer(pretrained, what: str = "this mode"):
    if pretrained.tokenizer is None:
        raise CheckpointError(
            f"{pretrained.path} has no tokenizer.json, which {what} needs; save the model with its tokenizer "
            "(save_pretrained(model, folder, tokenizer))"
        )
    vocab = pretrained.tokenizer.vocab_size
    if vocab > pretrained.model.cfg.vocab_size:
        raise CheckpointError(
            f"{pretrained.path}: tokenizer has {vocab} ids but the model only {pretrained.model.cfg.vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    return pretrained.tokenizer


# ---- run folders --------------------------------------------------------------------------------
def find_run_dir(path: str | Path) -> Path | None:
    """The training run folder that `path` (run folder, pretrained/, checkpoints/x.ckpt, ...) belongs to."""
    path = Path(str(path)).expanduser().resolve()
    candidates = [path]
    if path.name in ("pretrained", "checkpoints"):
        candidates.append(path.parent)  # RUN_DIR/pretrained, RUN_DIR/checkpoints
    if path.parent.name == "checkpoints":
        candidates.append(path.parent.parent)  # RUN_DIR/checkpoints/last.ckpt or a sharded step folder
    for candidate in candidates:
        if is_run_dir(candidate):
            return candidate
    return None


def read_run_config(run_dir: str | Path | None) -> dict | None:
    """The training config as plain dicts: `config.yaml` (written by training, fully resolved), else the
    composed `.hydra/config.yaml` with interpolations resolved where possible (Hydra saves them
    unresolved; `${hydra:...}` cannot resolve outside Hydra and stays as text)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml/omegaconf raise several kinds
        raise DataError(f"{path} is not a readable config ({type(e).__name__}); check the run folder") from None
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra: resolve key by key
        return _resolve_partially(conf)


def _resolve_partially(conf):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(conf, DictConfig):
        out = {}
        for key in conf.keys():
            try:
                value = conf[key]
            except Exception:  # noqa: BLE001
                out[key] = OmegaConf.to_container(conf, resolve=False)[key]
                continue
            out[key] = _resolve_partially(value) if isinstance(value, (DictConfig, ListConfig)) else value
        return out
    if isinstance(conf, ListConfig):
        return [_resolve_partially(v) if isinstance(v, (DictConfig, ListConfig)) else v for v in conf]
    return conf


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}); rewrite or delete it") from None


def _number(text: str):
    text = text.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    if math.isfinite(value) and value == int(value) and "." not in text and "e" not in text.lower():
        return int(value)
    return value


def read_metrics(run_dir: Path) -> dict[str, list]:
    """metrics.csv as columns: {name: [value or None per row]} (empty cell = not logged in that row)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    columns: dict[str, list] = {h: [] for h in header}
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        row = row + [""] * (len(header) - len(row))
        for name, cell in zip(header, row):
            columns[name].append(_number(cell))
    return columns


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in RUN_MARKERS)


def _job_order(path: Path):
    """Multirun job folders in job order: 0/, 1/, ..., 10/ (train.py names them 0_mha_tiny, 1_lrkv_tiny, ...)."""
    match = re.match(r"\d+", path.name)
    return (match is None, int(match.group()) if match else 0, path.name)


def expand_runs(paths) -> list[Path]:
    """Run folders from a list of run folders and/or multirun folders (job sub-folders 0/, 1/ or 0_name/, ...)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no runs given: pass runs=[RUN_DIR1,RUN_DIR2,...] or runs=[MULTIRUN_DIR]")
    runs: list[Path] = []
    for raw in paths:
        path = Path(str(raw)).expanduser()
        if not path.exists():
            raise DataError(f"run folder {path} does not exist; pass training run folders or a multirun folder")
        if is_run_dir(path):
            runs.append(path)
            continue
        children = sorted((c for c in path.iterdir() if is_run_dir(c)), key=_job_order)
        if not children:
            raise DataError(
                f"{path} is neither a run folder (no metrics.csv, summary.json or .hydra/config.yaml) "
                "nor a multirun folder of numbered run folders"
            )
        runs.extend(children)
    return runs
