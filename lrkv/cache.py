"""KV caches for decoding.

`LayerCache` holds the named tensors one attention layer needs, preallocated as (B, max_len, ...)
and filled left to right; each attention kind decides what to store (see `Attention.new_cache`).
`KVCache` is the model's list of layer caches. Its footprint is measured by summing the real
tensors, which the tests compare with the analytic formula of each kind.
"""

from __future__ import annotations

import torch

from lrkv.errors import ConfigError


class LayerCache:
    """Named buffers of shape (batch, max_len, ...) and the number of positions filled."""

    def __init__(self, **buffers: torch.Tensor):
        shapes = {tuple(b.shape[:2]) for b in buffers.values()}
        if len(shapes) != 1:
            raise ValueError(f"cache buffers disagree on (batch, max_len): {shapes}")
        self.buffers = buffers
        self.batch_size, self.max_len = shapes.pop()
        self.length = 0

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write `new[name]` (B, T, ...) after the filled positions; return views of all filled positions."""
        if set(new) != set(self.buffers):
            raise ValueError(f"cache expects {sorted(self.buffers)}, got {sorted(new)}")
        t = next(iter(new.values())).shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ConfigError(
                f"KV cache is full: {start} + {t} tokens > max_len={self.max_len}; "
                "create the cache with a larger max_len"
            )
        for name, value in new.items():
            self.buffers[name][:, start:end] = value
        self.length = end
        return {name: buf[:, :end] for name, buf in self.buffers.items()}

    def nbytes(self, filled_only: bool = True) -> int:
        n = self.length if filled_only else self.max_len
        return sum(b[:, :n].numel() * b.element_size() for b in self.buffers.values())


class KVCache:
    """One LayerCache per layer; `length` is the number of tokens already processed."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def nbytes(self, filled_only: bool = True) -> int:
        """Bytes of all cache tensors (only the filled positions by default)."""
        return sum(layer.nbytes(filled_only) for layer in self.layers)

    def nbytes_per_token(self) -> float:
        """Measured bytes per cached token per sequence, all layers: filled bytes / (batch x length)."""
        if self.length == 0:
            raise ValueError("the cache is empty: run a prefill before measuring bytes per token")
        return self.nbytes() / (self.batch_size * self.length)

    def reset(self) -> None:
        for layer in self.layers:
            layer.length = 0
