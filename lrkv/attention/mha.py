"""Multi-head attention (MHA): every query head has its own key/value head, i.e. GQA with G = H.

KV cache per token and layer: 2*H*d_h elements.
"""

from lrkv.errors import ConfigError

from . import register
from .gqa import GroupedQueryAttention, check_kv_heads


@register("mha")
class MultiHeadAttention(GroupedQueryAttention):
    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.kv_heads is None:
            cfg.kv_heads = cfg.n_head
        check_kv_heads(cfg, cls.kind)
        if cfg.kv_heads != cfg.n_head:
            raise ConfigError(f"attention=mha needs kv_heads == n_head ({cfg.n_head}); for fewer use attention=gqa")
