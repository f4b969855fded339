"""Reading training checkpoints: Lightning checkpoint files and sharded FSDP (torch.distributed.checkpoint) folders.

    RUN_DIR/checkpoints/step-XXXXXXXX.ckpt   a file (one process) or a folder of shards (FSDP: meta.pt,
                                             .metadata and one shard file per rank)
    RUN_DIR/checkpoints/last.ckpt            a symlink to the newest complete one

Both are read in a single process without pickled code: `weights_only=True` for the files and
meta.pt, torch.distributed.checkpoint's reader (`no_dist=True`) for the shards. The model config
comes from the checkpoint's hyperparameters, the tokenizer from the run folder's `tokenizer.json`.
Writing them (atomically) is lrkv.training.checkpointing's job.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError
from lrkv.io.pretrained import Pretrained, load_tokenizer, load_weights
from lrkv.model import Transformer

LAST = "last.ckpt"
PREFIX = "model."  # the Transformer is LanguageModel.model


def resolve_last(checkpoint_dir: Path) -> Path | None:
    """The checkpoint `last.ckpt` points to, or None when there is none yet."""
    link = Path(checkpoint_dir) / LAST
    if link.is_symlink():
        target = link.resolve()
        return target if target.exists() else None
    return link if link.exists() else None


def is_sharded_checkpoint(path: Path) -> bool:
    """A folder written by torch.distributed.checkpoint (FSDP): meta.pt and/or .metadata."""
    path = Path(path)
    return path.is_dir() and ((path / "meta.pt").is_file() or (path / ".metadata").is_file())


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file/folder from a path that may be a run folder or its checkpoints/ folder."""
    path = Path(path)
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (folder / LAST).exists():
            return resolve_last(folder)
    if path.is_file() or (path / "meta.pt").is_file():
        return path
    raise CheckpointError(
        f"no checkpoint found at {path}; pass a run folder, a .ckpt file or a sharded checkpoint folder"
    )


def read_metadata(ckpt: Path) -> dict:
    """A checkpoint file's contents, or a sharded folder's meta.pt (everything but the tensors)."""
    ckpt = Path(ckpt)
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
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {PREFIX + k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"sharded checkpoint {ckpt} could not be read ({type(e).__name__}); it may be incomplete"
        ) from None
    return strip_prefix(state["state_dict"])


def load_training_checkpoint(path: str | Path) -> Pretrained:
    """Model (eval mode, CPU) and tokenizer of a Lightning checkpoint, a sharded folder or a run's newest checkpoint."""
    ckpt = find_checkpoint(Path(path))
    metadata = read_metadata(ckpt)
    model = Transformer(model_config_of(metadata, ckpt))
    state = load_sharded_state(model, ckpt) if ckpt.is_dir() else strip_prefix(metadata.get("state_dict", {}))
    load_weights(model, state, ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    step = metadata.get("global_step")
    return Pretrained(model.eval(), load_tokenizer(run_dir), ckpt, int(step) if isinstance(step, int) else None)
