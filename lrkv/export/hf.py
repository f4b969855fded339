"""Write a Hugging Face transformers folder from any lrkv checkpoint: `export_run(ckpt, out)`.

    out/config.json              LlamaForCausalLM, or LrkvForCausalLM with auto_map (remote code)
    out/model.safetensors        the weights (float32)
    out/configuration_lrkv.py    remote code (copied from this package; imports only torch + transformers)
    out/modeling_lrkv.py
    out/model_config.json        lrkv's own config (remote-code folders), so lrkv loads the folder back too
    out/tokenizer.json, tokenizer_config.json, special_tokens_map.json    PreTrainedTokenizerFast
    out/generation_config.json   end-of-text as eos and pad
    out/README.md                model card

Llama-compatible MHA/GQA/MQA models (see llama.py) become a plain LlamaForCausalLM folder; every other
model (mla, lrkv incl. the decoupled variant, compressed_kv, and MHA/GQA/MQA with lrkv's own choices)
uses the remote code, whose weight names are lrkv's own. The folder is written next to `out` under a
temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from safetensors.torch import save_file

from lrkv.errors import ConfigError
from lrkv.export.card import model_card
from lrkv.export.llama import llama_config, llama_mismatch, llama_state_dict
from lrkv.export.source import load_source

REMOTE_FILES = ("configuration_lrkv.py", "modeling_lrkv.py")
REMOTE_KINDS = ("mha", "gqa", "mqa", "mla", "lrkv", "compressed_kv")
AUTO_MAP = {
    "AutoConfig": "configuration_lrkv.LrkvConfig",
    "AutoModelForCausalLM": "modeling_lrkv.LrkvForCausalLM",
}


def export_run(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export checkpoint `ckpt` as a transformers folder `out`; returns `out`.

    `out` must not exist or be empty unless `overwrite` (then it is replaced). A checkpoint without a
    tokenizer is exported without tokenizer files (a one-line note on stderr says so).
    """
    out = Path(str(out)).expanduser()
    check_output(out, Path(str(ckpt)).expanduser(), overwrite)
    source = load_source(ckpt)
    cfg = source.model.cfg
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_folder(tmp, source)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if source.tokenizer is None:
        print(
            f"note: {source.path} has no tokenizer.json: exported the {cfg.attention} model to {out} without "
            "tokenizer files (copy the training tokenizer.json there to use it on text)",
            file=sys.stderr,
        )
    return out


def check_output(out: Path, ckpt: Path, overwrite: bool) -> None:
    """One-line errors for an output that is a file, holds files (without overwrite), or holds the checkpoint."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export output {out} is a file; pass a folder path for out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export output {out} exists and is not empty; pass overwrite=true or another out folder")
    resolved, source = out.resolve(), ckpt.resolve()
    if resolved == source or resolved in source.parents:
        raise ConfigError(f"export output {out} holds the checkpoint {ckpt}; choose an out folder outside it")


def special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    eos = tokenizer.eos_id
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def remote_config(cfg, ids: dict) -> dict:
    """config.json of the remote-code model equal to `cfg` (see configuration_lrkv.py for the fields)."""
    if cfg.attention not in REMOTE_KINDS:
        raise ConfigError(
            f"attention={cfg.attention!r} has no Hugging Face export yet (exportable: {', '.join(REMOTE_KINDS)}); "
            "add it to lrkv/export/modeling_lrkv.py"
        )
    config = {
        "architectures": ["LrkvForCausalLM"],
        "model_type": "lrkv",
        "auto_map": AUTO_MAP,
        "attention_kind": cfg.attention,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": cfg.mlp_act,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "norm_affine": cfg.norm_affine,
        "embed_norm": cfg.embed_norm,
        "qk_norm": cfg.qk_norm,
        "rope_theta": cfg.rope_theta,
        "logit_softcap": cfg.logit_softcap or None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
        **ids,
    }
    if cfg.attention in ("mha", "gqa", "mqa", "compressed_kv"):
        config["num_key_value_heads"] = cfg.kv_heads
    if cfg.attention == "mla":
        config.update(kv_latent=cfg.kv_latent, q_latent=cfg.q_latent, rope_dim=cfg.rope_dim)
    if cfg.attention == "lrkv":
        config.update(rank=cfg.rank, residual_rope=getattr(cfg, "residual_rope", True) is not False)
    if cfg.attention == "compressed_kv":
        config.update(k_ranks=list(cfg.attn_options["k_ranks"]), v_ranks=list(cfg.attn_options["v_ranks"]))
    return config


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_folder(folder: Path, source) -> None:
    model, cfg, tokenizer = source.model, source.model.cfg, source.tokenizer
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    ids = special_ids(tokenizer)
    llama = llama_mismatch(cfg) is None
    if llama:
        write_json(folder / "config.json", llama_config(cfg, ids))
        state = llama_state_dict(state, cfg)
    else:
        write_json(folder / "config.json", remote_config(cfg, ids))
        write_json(folder / "model_config.json", cfg.to_dict())
        for name in REMOTE_FILES:
            (folder / name).write_text(resources.files("lrkv.export").joinpath(name).read_text())
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "generation_config.json", {**ids, "_from_model_config": False})
    if tokenizer is not None:
        write_tokenizer(folder, tokenizer, cfg.max_seq_len)
    params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    card = model_card(cfg, params, source.run, llama, tokenizer is not None, str(source.path))
    (folder / "README.md").write_text(card)


def write_tokenizer(folder: Path, tokenizer, max_len: int) -> None:
    """tokenizer.json + the config that makes AutoTokenizer load it as PreTrainedTokenizerFast, encoding as lrkv does
    (text never becomes a special token: split_special_tokens; nothing is added around the text)."""
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True))
    eos = tokenizer.eos_token
    special = {"bos_token": eos, "eos_token": eos, "pad_token": eos, "unk_token": None}
    write_json(folder / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_len,
        },
    )
