"""The plain `LlamaForCausalLM` form of Llama-compatible lrkv models (no remote code).

An MHA/GQA/MQA model whose choices are Llama's — SwiGLU MLP, no QK-norm, no logit soft-cap, RMSNorm with
weights, no norm after the embedding — is a Llama model. Its weights map one to one (the inverse of
lrkv/io/hf_llama.py, which imports such folders back):

    embed -> model.embed_tokens;  attn_norm -> input_layernorm;  mlp_norm -> post_attention_layernorm
    wq/wk/wv/wo -> self_attn.q/k/v/o_proj;  mlp.up = [gate; up] -> mlp.gate_proj, mlp.up_proj;  mlp.down -> down_proj
    norm -> model.norm;  lm_head -> lm_head (absent when the embeddings are tied)

RoPE uses the same rotate-half convention and inverse frequencies θ^(-2i/d_h) in both.
"""

from __future__ import annotations

import torch

LLAMA_KINDS = ("mha", "gqa", "mqa")


def llama_mismatch(cfg) -> str | None:
    """Why `cfg` is not a Llama model (the first difference), or None when it is one."""
    checks = [
        (cfg.attention in LLAMA_KINDS, f"attention={cfg.attention}"),
        (cfg.mlp_act == "swiglu", f"mlp_act={cfg.mlp_act}"),
        (not cfg.qk_norm, "qk_norm=true"),
        (not cfg.logit_softcap, f"logit_softcap={cfg.logit_softcap}"),
        (cfg.norm_affine, "norm_affine=false"),
        (not cfg.embed_norm, "embed_norm=true"),
    ]
    return next((why for ok, why in checks if not ok), None)


def llama_config(cfg, special_ids: dict) -> dict:
    """config.json of the LlamaForCausalLM equal to `cfg` (fields read by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
        **special_ids,
    }


def llama_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict under Llama's names."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layer):
        o, p = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = state[o + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = state[o + "mlp_norm.weight"]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[p + f"self_attn.{theirs}.weight"] = state[o + f"attn.{ours}.weight"]
        gate, up = state[o + "mlp.up.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = state[o + "mlp.down.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out
