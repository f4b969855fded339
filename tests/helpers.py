"""Shared test helpers: tiny configs of every kind and random non-trivial weights."""

import math

import torch

from lrkv import ModelConfig, Transformer

KIND_OPTIONS = {
    "mha": {},
    "gqa": {"kv_heads": 2},
    "mqa": {},
    "mla": {"kv_latent": 12, "rope_dim": 8},
    "lrkv": {"rank": 5},
}
KINDS = list(KIND_OPTIONS)


def tiny_config(kind: str, **overrides) -> ModelConfig:
    base = dict(attention=kind, n_layer=2, n_head=4, d_model=48, head_dim=16, vocab_size=97, max_seq_len=64)
    return ModelConfig(**{**base, **KIND_OPTIONS[kind], **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random non-trivial values (the default init zeros output projections)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1] if not name.endswith(("bk", "bv")) else p.shape[-2]
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(fan_in, 1)))
    return model


def random_model(kind: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return randomize(Transformer(tiny_config(kind, **overrides)), seed).eval()


def decode_in_chunks(model, x, sizes, cache_dtype=torch.float32):
    """Logits from feeding x through a KV cache in chunks of `sizes` tokens (prefill, then decode)."""
    cache = model.new_cache(x.shape[0], x.shape[1] + 4, dtype=cache_dtype)
    outs, start = [], 0
    for size in sizes:
        outs.append(model(x[:, start : start + size], cache))
        start += size
    assert start == x.shape[1] and cache.length == start
    return torch.cat(outs, dim=1)
