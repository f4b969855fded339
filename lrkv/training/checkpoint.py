"""Saving and loading trained models without pickled code.

A *pretrained folder* holds everything needed to use a model:

    model_config.json     ModelConfig fields (JSON)
    model.safetensors     weights (safetensors: no code execution on load)
    tokenizer.json        the tokenizer (JSON), when there is one

`load_pretrained(path)` accepts such a folder, a training run folder (it looks for the exported
folder and then for the newest checkpoint under `checkpoints/`), a checkpoint file or sharded
checkpoint folder, or a local Hugging Face Llama-style folder (lrkv/compress/hf_llama.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lrkv.config import ModelConfig
from lrkv.data.utils import atomic_write, staged
from lrkv.errors import CheckpointError
from lrkv.model import Transformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "model_config.json", "model.safetensors", "tokenizer.json"


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: object | None  # lrkv.data.tokenizer.Tokenizer
    path: Path  # the folder (or file) it came from


def save_pretrained(model: Transformer, folder: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write model_config.json, model.safetensors (and tokenizer.json) into `folder`, each atomically.

    `state_dict` may be given when the weights come from elsewhere (e.g. gathered from FSDP shards).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with staged(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write(str(folder / CONFIG_FILE), json.dumps(model.cfg.to_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(str(folder / TOKENIZER_FILE))
    return folder


def read_model_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({e.msg}); re-export the model") from None


def load_tokenizer(folder: Path):
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    from lrkv.data.tokenizer import Tokenizer

    return Tokenizer.load(str(path))


def load_weights(model: Transformer, state: dict, source: Path) -> None:
    """load_state_dict with one-line errors for a checkpoint of another model shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{source} does not fit model {model.cfg.name!r} ({what}); load it with the model config it was trained with"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)}, model {model.cfg.name!r} expects "
                f"{tuple(own[name].shape)}; use the model config the checkpoint was trained with"
            )
    model.load_state_dict(state)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Pretrained:
    """Load a model (and its tokenizer) from a pretrained folder, a run folder or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run folder or a checkpoint file")
    folder = find_pretrained_folder(path)
    if folder is None and is_hf_llama_folder(path):
        from lrkv.compress.hf_llama import load_hf_llama, load_hf_tokenizer

        model = load_hf_llama(path).to(device=device, dtype=dtype).eval()
        return Pretrained(model, load_hf_tokenizer(path), path)
    if folder is None:
        from lrkv.training.resume import load_from_training_checkpoint  # Lightning checkpoints

        return load_from_training_checkpoint(path, device=device, dtype=dtype)
    cfg = read_model_config(folder)
    model = Transformer(cfg)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} is unreadable or corrupt ({type(e).__name__}); re-export it"
        ) from None
    load_weights(model, state, folder / WEIGHTS_FILE)
    model.to(device=device, dtype=dtype).eval()
    return Pretrained(model, load_tokenizer(folder), folder)


def is_hf_llama_folder(path: Path) -> bool:
    """A local Hugging Face folder (config.json with `architectures`, safetensors weights)."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file() and any(path.glob("*.safetensors"))):
        return False
    try:
        return "architectures" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def find_pretrained_folder(path: Path) -> Path | None:
    """The folder with model_config.json + model.safetensors: path itself or its `pretrained/` child."""
    for candidate in (path, path / "pretrained"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None
