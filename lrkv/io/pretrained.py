"""The pretrained folder: everything needed to use a model, without pickled code.

    model_config.json     ModelConfig fields (JSON)
    model.safetensors     weights (safetensors: no code execution on load)
    tokenizer.json        the tokenizer (JSON), when there is one

Written by `lrkv.training.checkpoint.save_pretrained` (at the end of training, by compression and
export); read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError
from lrkv.model import Transformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "model_config.json", "model.safetensors", "tokenizer.json"


@dataclass
class Pretrained:
    """A loaded model with its tokenizer. Unpacks as `model, tokenizer = lrkv.load_pretrained(path)`."""

    model: Transformer
    tokenizer: object | None  # lrkv.data.tokenizer.Tokenizer
    path: Path  # the folder (or checkpoint) it came from
    step: int | None = None  # optimizer step of the weights when known (training checkpoints, run folders)

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def find_pretrained_folder(path: Path) -> Path | None:
    """The folder with model_config.json + model.safetensors: path itself or its `pretrained/` child."""
    path = Path(path)
    for candidate in (path, path / "pretrained"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def read_model_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({e.msg}); re-export the model") from None


def load_tokenizer(folder: Path):
    """The folder's tokenizer.json as an lrkv Tokenizer, or None when there is none."""
    path = Path(folder) / TOKENIZER_FILE
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
            f"{source} does not fit model {model.cfg.name!r} ({what}); "
            "load it with the model config it was trained with"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)}, model {model.cfg.name!r} expects "
                f"{tuple(own[name].shape)}; use the model config the checkpoint was trained with"
            )
    model.load_state_dict(state)


def load_pretrained_folder(folder: Path) -> Pretrained:
    """Model (in eval mode, on the CPU in the saved dtype) and tokenizer of a pretrained folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model = Transformer(read_model_config(folder))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} is unreadable or corrupt ({type(e).__name__}); re-export it"
        ) from None
    load_weights(model, state, folder / WEIGHTS_FILE)
    return Pretrained(model.eval(), load_tokenizer(folder), folder)
