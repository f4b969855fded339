"""What is at this path, and the one loader.

`resolve(path)` answers "what is at this path?" for every format lrkv reads:

    pretrained   a pretrained folder (model_config.json + model.safetensors [+ tokenizer.json]),
                 or a run folder holding one under pretrained/ (the model at the end of training)
    checkpoint   a Lightning checkpoint file (.ckpt), or a run folder / checkpoints/ folder whose
                 last.ckpt points at one (a run stopped before it exported pretrained/)
    sharded      an FSDP checkpoint folder of torch.distributed.checkpoint shards (meta.pt, .metadata)
    hf_llama     a local Hugging Face Llama folder (config.json with `architectures` + *.safetensors)

and anything else is a one-line `CheckpointError` naming what was expected. `load_pretrained(path)`
loads what `resolve` found: the model in eval mode on `device` in `dtype`, its tokenizer, the path it
came from and, when known, the optimizer step of the weights (`lrkv.load_pretrained` is this function).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lrkv.errors import CheckpointError, ConfigError
from lrkv.io.checkpoints import LAST, find_checkpoint, is_sharded_checkpoint, load_training_checkpoint
from lrkv.io.hf_llama import is_hf_llama_folder
from lrkv.io.pretrained import Pretrained, find_pretrained_folder, load_pretrained_folder

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


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """ "bfloat16", "bf16", torch.bfloat16 ... -> torch.bfloat16; None -> default; else a one-line ConfigError."""
    if name is None or name == "":
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"dtype {name!r} is unknown; use float32, bfloat16 or float16")
    return DTYPES[key]


@dataclass(frozen=True)
class Found:
    kind: str  # "pretrained" | "checkpoint" | "sharded" | "hf_llama"
    path: Path  # what will be read: the pretrained folder, the checkpoint file or folder, the HF folder


def resolve(path: str | Path) -> Found:
    """What is at `path` (see the module docstring); a one-line CheckpointError when nothing loadable is."""
    if path is None or str(path) == "":
        raise ConfigError("no checkpoint path given; pass a run folder, a pretrained folder or a checkpoint file")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path {path} does not exist; pass a run folder, a pretrained folder or a checkpoint file"
        )
    folder = find_pretrained_folder(path)
    if folder is not None:
        return Found("pretrained", folder)
    if is_hf_llama_folder(path):
        return Found("hf_llama", path)
    if path.is_file():
        return Found("checkpoint", path)
    if is_sharded_checkpoint(path):
        return Found("sharded", path)
    if (path / LAST).exists() or (path / "checkpoints" / LAST).exists():
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"{path}: last.ckpt points at a checkpoint that is gone; pass a checkpoint file")
        return Found("sharded" if ckpt.is_dir() else "checkpoint", ckpt)
    raise CheckpointError(
        f"{path} holds no model: expected model_config.json + model.safetensors, a pretrained/ folder, "
        "Lightning checkpoints under checkpoints/ (last.ckpt), or a Hugging Face Llama folder"
    )


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Pretrained:
    """Load the model (eval mode) and its tokenizer from any path `resolve` knows.

    dtype: None keeps the saved one (float32 for training checkpoints); a name or a torch.dtype casts.
    Unpacks as `model, tokenizer = load_pretrained(path)`; `.path` and `.step` tell where it came from.
    """
    found = resolve(path)
    if found.kind == "pretrained":
        loaded = load_pretrained_folder(found.path)
        loaded.step = exported_step(found.path)
    elif found.kind == "hf_llama":
        from lrkv.io.hf_llama import load_hf_llama, load_hf_tokenizer

        loaded = Pretrained(load_hf_llama(found.path), load_hf_tokenizer(found.path), found.path)
    else:
        loaded = load_training_checkpoint(found.path)
    cast = parse_dtype(dtype) if dtype is not None else None
    loaded.model.to(device=device, dtype=cast)
    return loaded


def exported_step(folder: Path) -> int | None:
    """The step of a run's pretrained/ folder: training exports it once, at the end (summary.json's steps)."""
    from lrkv.io.runs import read_summary

    if folder.name != "pretrained":
        return None
    steps = read_summary(folder.parent).get("steps")
    return steps if isinstance(steps, int) else None


def require_tokenizer(pretrained: Pretrained, what: str = "this mode"):
    """The loaded model's tokenizer; a one-line error when there is none or it does not fit the model."""
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
