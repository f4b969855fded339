"""Load a model from a training checkpoint (not only from the exported `pretrained/` folder).

Handles Lightning checkpoint files (one process) and FSDP sharded checkpoint folders (a `meta.pt`
plus one shard file per rank) in a single process, without pickled code: `weights_only=True` for
the files, torch.distributed.checkpoint's reader for the shards. The model config comes from the
checkpoint's hyperparameters; the tokenizer from the run folder's `tokenizer.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError
from lrkv.model import Transformer
from lrkv.training.checkpoint import Pretrained, load_tokenizer, load_weights
from lrkv.training.checkpointing import resolve_last

PREFIX = "model."  # the Transformer is LanguageModel.model


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file/folder from a path that may be a run folder or its checkpoints/ folder."""
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (folder / "last.ckpt").exists():
            return resolve_last(folder)
    if path.is_file() or (path / "meta.pt").is_file():
        return path
    raise CheckpointError(
        f"no checkpoint found at {path}; pass a run folder, a .ckpt file or a sharded checkpoint folder"
    )


def read_metadata(ckpt: Path) -> dict:
    meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    try:
        return torch.load(meta, map_location="cpu", weights_only=True, mmap=ckpt.is_file())
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {ckpt} is unreadable or corrupt ({type(e).__name__}); use an earlier one"
        ) from None


def model_config_of(metadata: dict, ckpt: Path) -> ModelConfig:
    model = (metadata.get("hyper_parameters") or {}).get("model")
    if not model:
        raise CheckpointError(
            f"checkpoint {ckpt} has no model config in its hyperparameters; it was not written by lrkv train.py"
        )
    return ModelConfig.from_dict(dict(model))


def strip_prefix(state: dict) -> dict:
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_sharded_state(model: Transformer, ckpt: Path) -> dict:
    """Read the model part of an FSDP sharded checkpoint into full tensors, in this single process."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {PREFIX + k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    try:
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"sharded checkpoint {ckpt} could not be read ({type(e).__name__}); it may be incomplete"
        ) from None
    return strip_prefix(state["state_dict"])


def load_from_training_checkpoint(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Pretrained:
    ckpt = find_checkpoint(Path(path))
    metadata = read_metadata(ckpt)
    cfg = model_config_of(metadata, ckpt)
    model = Transformer(cfg)
    state = load_sharded_state(model, ckpt) if ckpt.is_dir() else strip_prefix(metadata.get("state_dict", {}))
    load_weights(model, state, ckpt)
    model.to(device=device, dtype=dtype).eval()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return Pretrained(model, load_tokenizer(run_dir), ckpt)
