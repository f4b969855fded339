"""`train.init_from=RUN_OR_FOLDER`: start training from a pretrained model's weights.

Unlike `ckpt_path` (which resumes a run: weights, optimizer, schedule, data position, RNG), init_from
copies only the model's weights into the freshly built model; the optimizer, the learning-rate
schedule (warmup included) and the data order start from scratch. The source is anything evaluate.py
loads (run folder, pretrained folder, Lightning checkpoint, local Hugging Face Llama folder), e.g. the
output of MHA -> LRKV conversion (lrkv/convert.py).

The run's model config must describe the same function as the source: every ModelConfig field is
compared except those that do not change the weights or the computation (`IGNORED`). Unless
`tokenizer.path` is given, the run uses the source's tokenizer.json, so that token ids mean the same.
When a run with init_from resumes (`ckpt_path=last` and a checkpoint exists), the checkpoint wins and
init_from is not applied again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError, ConfigError

IGNORED = ("name", "attn_backend", "lrkv_impl", "residual_init", "max_seq_len")


def load_init_source(path):
    """The source as `Pretrained(model, tokenizer, path)` on the CPU in float32 (lrkv.io.load_pretrained)."""
    from lrkv.io import load_pretrained

    return load_pretrained(str(path), "cpu", "float32")


def tokenizer_path(source) -> str:
    """A tokenizer.json path for the data module: the source's own."""
    folder = Path(source.path)
    folder = folder if folder.is_dir() else folder.parent
    if source.tokenizer is None or not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"train.init_from={source.path} has no tokenizer.json; pass tokenizer=file tokenizer.path=TOKENIZER.json "
            "(the tokenizer the model was trained with)"
        )
    return str(folder / "tokenizer.json")


def check_compatible(source: ModelConfig, ours: ModelConfig, where: str) -> None:
    """One-line CheckpointError naming the first model field that differs."""
    theirs, mine = source.to_dict(), ours.to_dict()
    for key in theirs:
        if key not in IGNORED and theirs[key] != mine.get(key):
            if key == "vocab_size" and theirs[key] < mine.get(key, 0):
                continue  # the tokenizer grew (chat tokens): grow_vocab gives the new ids rows
            if key == "vocab_size":
                raise CheckpointError(
                    f"train.init_from={where} has vocab_size {theirs[key]}, this run {mine.get(key)}; train with the "
                    f"source's tokenizer, or set train.vocab_from_tokenizer=false model.vocab_size={theirs[key]}"
                )
            raise CheckpointError(
                f"train.init_from={where} has model.{key}={theirs[key]!r}, this run has {mine.get(key)!r}; "
                f"set model.{key}={theirs[key]} (the source is a {source.attention} model: {source.name})"
            )


VOCAB_KEYS = ("embed.weight", "lm_head.weight")


@torch.no_grad()
def grow_vocab(state: dict[str, torch.Tensor], vocab_size: int, known: int) -> dict[str, torch.Tensor]:
    """The source's weights for a model of ``vocab_size`` ids whose tokenizer added ids from ``known`` on.

    The embedding and LM head rows of ids < ``known`` (the source tokenizer's tokens) are kept; every
    row from ``known`` on (new special tokens and padding, including padding rows the source had) is the
    mean of the known rows: a new token starts as an "average" token, and its logit is the mean of the
    known tokens' logits. Logits of known tokens on known inputs are unchanged."""
    out = dict(state)
    for key in VOCAB_KEYS:
        weight = state.get(key)
        if weight is None or (weight.shape[0] == vocab_size and known >= vocab_size):
            continue
        if known > weight.shape[0]:
            raise CheckpointError(f"{key} has {weight.shape[0]} rows for a tokenizer of {known} ids")
        mean = weight[:known].float().mean(0).to(weight.dtype)
        grown = mean.expand(vocab_size, -1).clone()
        grown[:known] = weight[:known]
        out[key] = grown
    return out


class InitFrom(L.Callback):
    """Copy the source's weights into the model at the start of fit (after the model and optimizer are
    built, before the first step), on every rank; FSDP-sharded parameters receive their shards."""

    def __init__(self, state: dict[str, torch.Tensor], where: str):
        self.state, self.where = state, where

    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, self.state, options=StateDictOptions(full_state_dict=True))
        else:
            from lrkv.io.pretrained import load_weights

            load_weights(model, self.state, Path(self.where))
        self.state = {}  # free the copy
