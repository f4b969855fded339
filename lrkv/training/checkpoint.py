"""Saving trained models without pickled code: the pretrained folder (format and reading: lrkv/io/pretrained.py).

    model_config.json     ModelConfig fields (JSON)
    model.safetensors     weights (safetensors: no code execution on load)
    tokenizer.json        the tokenizer (JSON), when there is one

Load with `lrkv.load_pretrained(path)` (lrkv/io), which also reads run folders, Lightning and sharded
checkpoints and local Hugging Face Llama folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from lrkv.data.utils import atomic_write, staged
from lrkv.io.pretrained import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from lrkv.model import Transformer


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
