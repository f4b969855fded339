"""The model card (README.md) of an exported folder: kind, shapes, cache layout, KV bytes per token, training facts."""

from __future__ import annotations

import torch


def cache_layout(cfg) -> str:
    """What the cache stores per token and layer (elements), as a serving engine would lay it out."""
    h, dh, kind = cfg.n_head, cfg.head_dim, cfg.attention
    if kind in ("mha", "gqa", "mqa"):
        g = cfg.kv_heads
        return f"k, v: {g}×{dh} each (keys after QK-norm and RoPE) = {2 * g * dh}"
    if kind == "mla":
        d_c, d_r = cfg.kv_latent, cfg.rope_dim
        return f"c: {d_c} (normalised latent), k_r: {d_r} (RoPE key) = {d_c + d_r}"
    if kind == "lrkv":
        r = cfg.rank
        shared = "RoPE(norm(k_s)), v_s" if getattr(cfg, "residual_rope", True) is False else "k_s, v_s (raw)"
        return f"{shared}: {dh} each; latents r_k, r_v: {h}×{r} each = {2 * dh + 2 * h * r}"
    if kind == "compressed_kv":
        g, kr, vr = cfg.kv_heads, cfg.attn_options["k_ranks"], cfg.attn_options["v_ranks"]
        per_layer = ", ".join(f"{g * (a + b)}" for a, b in zip(kr, vr))
        return f"k: {g}×r_K, v: {g}×r_V per layer (r_K = {kr}, r_V = {vr}) = {per_layer}"
    return "see the attention kind's documentation"


def kind_label(cfg) -> str:
    if cfg.attention == "lrkv" and getattr(cfg, "residual_rope", True) is False:
        return "lrkv (decoupled: residual_rope=false)"
    return cfg.attention


def model_card(cfg, params: int, facts: dict, llama: bool, has_tokenizer: bool, source: str) -> str:
    bf16, fp32 = cfg.kv_cache_bytes_per_token(torch.bfloat16), cfg.kv_cache_bytes_per_token(torch.float32)
    load = (
        "model = AutoModelForCausalLM.from_pretrained(path)  # a plain LlamaForCausalLM"
        if llama
        else "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    )
    rows = [
        ("attention", kind_label(cfg)),
        ("layers × width", f"{cfg.n_layer} × {cfg.d_model}"),
        ("heads × head dim", f"{cfg.n_head} × {cfg.head_dim}"),
        ("vocabulary, context", f"{cfg.vocab_size}, {cfg.max_seq_len}"),
        ("MLP", f"{cfg.mlp_act}, width {cfg.mlp_hidden}"),
        (
            "norms",
            f"RMSNorm {'with' if cfg.norm_affine else 'without'} weights"
            + (", after the embedding" if cfg.embed_norm else "")
            + (", QK-norm" if cfg.qk_norm and cfg.attention != "mla" else ""),
        ),
        ("logit soft-cap", str(cfg.logit_softcap or "none")),
        ("parameters", f"{params:,}"),
        ("cache per token and layer (elements)", cache_layout(cfg)),
        ("KV cache bytes per token (all layers)", f"{bf16:,} (bf16), {fp32:,} (fp32)"),
    ]
    names = {
        "tokens": "training tokens",
        "steps": "optimizer steps",
        "final_train_loss": "final train loss (nats/token)",
        "final_val_loss": "final validation loss (nats/token)",
        "final_val_bpb": "final validation bits per byte",
    }
    for key, name in names.items():
        if key in facts:
            value = facts[key]
            rows.append((name, f"{value:,}" if isinstance(value, int) else f"{value:.4f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tokenizer = (
        f"`tokenizer = AutoTokenizer.from_pretrained(path{'' if llama else ', trust_remote_code=True'})` (the "
        "training tokenizer; `<|endoftext|>` is the end-of-text token and precedes every document in training)"
        if has_tokenizer
        else "**No tokenizer was written**: the checkpoint had none. Add its tokenizer.json to use the model on text."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{"lrkv" if cfg.attention == "lrkv" else "lrkv, " + cfg.attention}]
---

# {cfg.name} ({kind_label(cfg)})

Exported by lrkv (`lrkv.export.export_run`) from `{source}`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{load}
```

{tokenizer}

| | |
|---|---|
{table}

{
        "This is a Llama model: every tool that reads LlamaForCausalLM reads it, with a standard KV cache."
        if llama
        else "The remote code (configuration_lrkv.py, modeling_lrkv.py) imports only torch and transformers. Its cache "
        "(`LrkvCache`) stores exactly the tensors listed above and grows with the sequence; `model.generate()` uses it."
    }
"""
