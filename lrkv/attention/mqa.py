"""Multi-query attention (MQA): one key/value head shared by all query heads, i.e. GQA with G = 1.

KV cache per token and layer: 2*d_h elements.
"""

from lrkv.errors import ConfigError

from . import register
from .gqa import GroupedQueryAttention, check_kv_heads


@register("mqa")
class MultiQueryAttention(GroupedQueryAttention):
    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.kv_heads is None:
            cfg.kv_heads = 1
        check_kv_heads(cfg, cls.kind)
        if cfg.kv_heads != 1:
            raise ConfigError(f"attention=mqa needs kv_heads == 1, got {cfg.kv_heads}; for more use attention=gqa")
