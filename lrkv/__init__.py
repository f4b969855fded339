"""lrkv: pretraining research on KV-cache-efficient attention (MHA, GQA, MQA, MLA, LRKV)."""

from lrkv.cache import KVCache, LayerCache
from lrkv.config import ModelConfig, list_presets, load_model_config
from lrkv.errors import CheckpointError, ConfigError, DataError, LrkvError
from lrkv.model import Transformer, param_counts


def load_pretrained(path, device="cpu", dtype=None):
    """(model, tokenizer) from a run folder, a pretrained folder, a Lightning .ckpt, a sharded FSDP checkpoint
    folder or a local Hugging Face Llama folder; the model in eval mode on `device`, cast to `dtype` if given
    ("bfloat16", torch.float16, ...). The result unpacks as `model, tokenizer = lrkv.load_pretrained(path)`
    and also carries `.path` (what was read) and `.step` (optimizer step of the weights, when known).

    Imports lrkv.io on first call, so that `import lrkv` stays light (see lrkv/io/load.py for the formats).
    """
    from lrkv.io.load import load_pretrained as load

    return load(path, device=device, dtype=dtype)


__all__ = [
    "ModelConfig",
    "Transformer",
    "KVCache",
    "LayerCache",
    "load_model_config",
    "list_presets",
    "load_pretrained",
    "param_counts",
    "LrkvError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
