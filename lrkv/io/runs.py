"""Reading a training run folder (what `train.py` leaves behind) and multirun folders.

    RUN_DIR/config.yaml          the resolved config the run trained with (.hydra/config.yaml: as composed)
    RUN_DIR/pretrained/          model_config.json, model.safetensors, tokenizer.json
    RUN_DIR/checkpoints/         Lightning checkpoints (files, or folders when sharded under FSDP)
    RUN_DIR/metrics.csv          step,tokens,train_loss,val_loss,val_bpb,lr,... (empty cell = not logged)
    RUN_DIR/summary.json         name, model, attention, params, kv_bytes_per_token, final losses, ...

A multirun folder holds numbered run folders 0/, 1/, ... . Every reader raises a one-line `LrkvError`
for an unreadable file; a file that is absent reads as empty. `read_metrics` is the one reader of
metrics.csv (training's summary and plot, evaluation's compare and loss modes).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from lrkv.errors import ConfigError, DataError

RUN_MARKERS = ("metrics.csv", "summary.json", "config.yaml", ".hydra/config.yaml")


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


def merged(base: dict | None, override: dict | None) -> dict:
    """Recursive dict merge: override's leaves win."""
    out = dict(base or {})
    for key, value in (override or {}).items():
        out[key] = merged(out.get(key), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_data_config(run_dir: str | Path | None, overrides: dict | None = None) -> dict | None:
    """The data config a run trained on (its held-out split) with `overrides` merged in; None: neither exists
    (scoring then uses the embedded corpus)."""
    run_cfg = read_run_config(run_dir) or {}
    run_data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else None
    return merged(run_data, overrides) or None


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


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.csv (of a run folder, or the file itself) as rows {column: number}, empty cells left out
    (a cell is empty when that row did not log it: validation rows carry val_loss/val_bpb). [] when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if not lines:
        return []
    header = [h.strip() for h in lines[0]]
    rows = []
    for line in lines[1:]:
        row = {name: _number(cell) for name, cell in zip(header, line) if cell.strip()}
        if row:
            rows.append(row)
    return rows


def metric_columns(rows: list[dict]) -> dict[str, list]:
    """Rows as columns {name: [value or None per row]}, every column as long as the rows."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def logged_val_loss(run_dir: str | Path | None, step: int | None) -> dict | None:
    """{"step", "val_loss", "val_bpb"} logged at exactly `step` in the run's metrics.csv, or None when the run
    logged no validation loss at that step (weights of another step must not be compared with it)."""
    if run_dir is None or step is None:
        return None
    for row in reversed(read_metrics(run_dir)):  # a resumed run may repeat a step: the newest row counts
        if row.get("step") == step and isinstance(row.get("val_loss"), (int, float)):
            return {"step": step, "val_loss": row["val_loss"], "val_bpb": row.get("val_bpb")}
    return None


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
