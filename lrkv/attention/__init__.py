"""Attention kinds behind one interface, chosen by `ModelConfig.attention`.

Every module in this package that defines a subclass of `Attention` decorated with `@register("name")`
is imported here automatically, so adding a kind is one new file (plus a preset YAML) and nothing else.
"""

import importlib
import pkgutil

from lrkv.errors import ConfigError

from .base import Attention, init_linear_

KINDS: dict[str, type[Attention]] = {}


def register(kind: str):
    """Class decorator: make an Attention subclass available as `attention: <kind>`."""

    def wrap(cls: type[Attention]) -> type[Attention]:
        if kind in KINDS and KINDS[kind] is not cls:
            raise ConfigError(f"attention kind {kind!r} is registered twice; give the new one another name")
        cls.kind = kind
        KINDS[kind] = cls
        return cls

    return wrap


def get_attention_class(kind: str) -> type[Attention]:
    if kind not in KINDS:
        raise ConfigError(f"unknown attention kind {kind!r}; available: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "kernel", "lrkv_triton"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Attention", "KINDS", "register", "get_attention_class", "init_linear_"]
