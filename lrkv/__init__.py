"""lrkv: pretraining research on KV-cache-efficient attention (MHA, GQA, MQA, MLA, LRKV)."""

from lrkv.cache import KVCache, LayerCache
from lrkv.config import ModelConfig, list_presets, load_model_config
from lrkv.errors import CheckpointError, ConfigError, DataError, LrkvError
from lrkv.model import Transformer, param_counts

__all__ = [
    "ModelConfig",
    "Transformer",
    "KVCache",
    "LayerCache",
    "load_model_config",
    "list_presets",
    "param_counts",
    "LrkvError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
