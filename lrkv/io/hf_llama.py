"""Load a local Hugging Face Llama-style folder (config.json + *.safetensors) as an lrkv Transformer.

Reads the files directly (JSON and safetensors), so `transformers` is not needed to load; it is an
optional extra (`pip install -e ".[hf]"`) used by the tests to build a reference model. Mapping:

    embed_tokens -> embed;  input_layernorm -> attn_norm;  post_attention_layernorm -> mlp_norm
    q/k/v/o_proj -> wq/wk/wv/wo;  [gate_proj; up_proj] -> mlp.up (swiglu);  down_proj -> mlp.down
    model.norm -> norm;  lm_head -> lm_head (absent when tie_word_embeddings)

with norm_affine=True, qk_norm=False, embed_norm=False, logit_softcap=None, mlp_act="swiglu",
mlp_ratio = intermediate_size / hidden_size, kv_heads = num_key_value_heads (attention "mha" when
equal to the heads, else "gqa"), rope_theta, rms_norm_eps, head_dim, tie_word_embeddings.

RoPE: lrkv/rope.py uses Hugging Face's rotate-half convention, so q/k weights map unchanged.

Refused (one-line CheckpointError): rope scaling (rope_type other than "default"), attention or MLP
biases, activations other than SiLU, pickled weights without safetensors, other architectures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError
from lrkv.model import Transformer

ARCHITECTURES = ("LlamaForCausalLM",)


def is_hf_llama_folder(path: Path) -> bool:
    """A local Hugging Face folder (config.json with `architectures`, safetensors weights)."""
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file() and any(path.glob("*.safetensors"))):
        return False
    try:
        return "architectures" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def llama_model_config(hf: dict, name: str) -> ModelConfig:
    """Our ModelConfig for a Llama config.json dict; CheckpointError for what we cannot represent."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or not set(archs) <= set(ARCHITECTURES):
        raise CheckpointError(
            f"{name}: model_type={hf.get('model_type')!r} {archs} is not a Llama causal LM; "
            "only LlamaForCausalLM folders convert"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 | 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{name}: rope scaling {rope_type!r} is not supported; convert a model with default RoPE")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{name}: {key}=true is not supported (lrkv layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{name}: hidden_act={hf.get('hidden_act')!r} is not supported; only silu (SwiGLU) converts"
        )
    d, inner, heads = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    ratio = inner / d
    while int(ratio * d) < inner:  # mlp_hidden = int(mlp_ratio * d_model) must give intermediate_size back
        ratio = math.nextafter(ratio, math.inf)
    return ModelConfig(
        name=name,
        attention="mha" if kv_heads == heads else "gqa",
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        d_model=d,
        head_dim=hf.get("head_dim") or d // heads,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        mlp_ratio=ratio,
        mlp_act="swiglu",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_affine=True,
        embed_norm=False,
        qk_norm=False,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        logit_softcap=None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        zero_init_out=False,
        kv_heads=kv_heads if kv_heads != heads else None,
    )


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights; save the model with safe_serialization=True")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_hf_llama(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of a local Llama folder (config.json + safetensors), in eval mode."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a local Hugging Face Llama folder")
    cfg = llama_model_config(json.loads((folder / "config.json").read_text()), f"hf:{folder.name}")
    hf = read_safetensors(folder)

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"{folder}: weight {key} is missing; is this a complete Llama checkpoint?")
        return hf.pop(key).to(torch.float32)

    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        state[o + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        state[o + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        state[o + "attn.wq.weight"] = take(p + "self_attn.q_proj.weight")
        state[o + "attn.wk.weight"] = take(p + "self_attn.k_proj.weight")
        state[o + "attn.wv.weight"] = take(p + "self_attn.v_proj.weight")
        state[o + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        state[o + "mlp.up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        state[o + "mlp.down.weight"] = take(p + "mlp.down_proj.weight")
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    hf.pop("lm_head.weight", None)
    leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError(
            f"{folder}: weight {leftover[0]} has no place in a Llama model without biases; not converted"
        )
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.to(dtype=dtype).eval()


def load_hf_tokenizer(path: str | Path):
    """The folder's tokenizer.json as an lrkv Tokenizer (eos token from tokenizer_config.json), or None."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        return None
    from lrkv.data import Tokenizer

    eos = "</s>"
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("eos_token", eos)
        eos = value.get("content", eos) if isinstance(value, dict) else value
    return Tokenizer.load(str(folder / "tokenizer.json"), eos_token=eos)
