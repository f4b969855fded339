"""From a full-attention model and per-layer bases to a compressed `Transformer` (kind compressed_kv).

Folding (see lrkv/attention/compressed.py), per layer with key basis P_K (d_h, r_K) and value
bases P_V,g (d_h, r_V):

    W'_V,g = P_V,g^T W_V,g              nn.Linear weight rows of group g: (r_V, d)
    W'_O,h = W_O,h P_V,g(h)             nn.Linear weight columns of head h: (d, r_V)
    pk     = P_K                        buffer; W_K, QK-norm, W_Q, MLP, norms, embeddings unchanged

`projected_logits` runs the source model with projected keys/values instead (no folding): the
reference the compressed model must reproduce, also through its cache.
"""

from __future__ import annotations

import torch

from lrkv.attention.compressed import KIND
from lrkv.model import Transformer

from .layer import check_source, projected_block


def fold_layer(attn, pk: torch.Tensor, pv: torch.Tensor) -> dict[str, torch.Tensor]:
    """The compressed attention weights of one source GQA layer: wk, wq, norms copied; pk; folded wv, wo."""
    h, g, dh, d = attn.n_head, attn.kv_heads, attn.head_dim, attn.d_model
    dtype, device = attn.wv.weight.dtype, attn.wv.weight.device
    pk, pv = pk.to(device=device, dtype=torch.float32), pv.to(device=device, dtype=torch.float32)
    wv = attn.wv.weight.float().view(g, dh, d)
    wo = attn.wo.weight.float().view(d, h, dh)
    group = torch.arange(h, device=device) // (h // g)
    state = {name: value for name, value in attn.state_dict().items() if not name.startswith(("wv.", "wo."))}
    state["pk"] = pk
    state["wv.weight"] = torch.einsum("gdr,gde->gre", pv, wv).reshape(-1, d)
    state["wo.weight"] = torch.einsum("ehd,hdr->ehr", wo, pv[group]).reshape(d, -1)
    return {name: value.to(dtype) for name, value in state.items()}


def build_compressed(
    model: Transformer, k_bases: list[torch.Tensor], v_bases: list[torch.Tensor], meta: dict | None = None
) -> Transformer:
    """A compressed copy of `model` with key bases (d_h, r_K,l) and value bases (G, d_h, r_V,l) per layer.

    meta: provenance stored in attn_options (method, source, budget, allocator, kv_ratio).
    """
    check_source(model)
    cfg = model.cfg
    options = {"k_ranks": [b.shape[-1] for b in k_bases], "v_ranks": [b.shape[-1] for b in v_bases], **(meta or {})}
    label = f"{cfg.name}+{options.get('method', 'kv')}" + (f"@{options['budget']:g}" if options.get("budget") else "")
    new_cfg = cfg.replace(attention=KIND, kv_heads=cfg.kv_heads, attn_options=options, name=label)
    state = {}
    for name, value in model.state_dict().items():
        if ".attn." not in name:
            state[name] = value
    for layer, (block, pk, pv) in enumerate(zip(model.blocks, k_bases, v_bases)):
        for name, value in fold_layer(block.attn, pk, pv).items():
            state[f"blocks.{layer}.attn.{name}"] = value
    with torch.device("meta"):
        compressed = Transformer(new_cfg)
    device = model.embed.weight.device
    compressed = compressed.to_empty(device=device).to(model.embed.weight.dtype)
    compressed.load_state_dict(state)
    return compressed.eval()


@torch.no_grad()
def projected_logits(model: Transformer, tokens: torch.Tensor, k_bases=None, v_bases=None) -> torch.Tensor:
    """Logits of the source model with keys/values projected onto the bases (None: unprojected)."""
    check_source(model)
    n = len(model.blocks)
    k_bases, v_bases = k_bases or [None] * n, v_bases or [None] * n
    x = model.embed_norm(model.embed(tokens))
    for block, pk, pv in zip(model.blocks, k_bases, v_bases):
        x = projected_block(block, x, pk, pv)
    return model.logits(model.norm(x))
