"""ModelConfig: every architectural choice of the Transformer, with the paper's defaults.

Presets live as YAML files in `configs/model/<name>.yaml` (the same files Hydra composes for
`python train.py model=<name>`); `load_model_config(name, **overrides)` reads them without Hydra.

Fields used by only one attention kind (`kv_heads`, `kv_latent`, `q_latent`, `rope_dim`, `rank`,
`residual_init`, `lrkv_impl`, `residual_rope`) default to None. Each kind declares the fields it owns and fills their
defaults during validation; setting a field that the chosen kind does not use is an error, so that
e.g. `model.rank=32` on an MHA model cannot be silently ignored. A new kind that needs its own
hyperparameters reads them from `attn_options` (a free dict), so adding it changes nothing here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from lrkv.errors import ConfigError

# The fields that belong to one attention kind (see lrkv/attention/*: `Attention.fields`).
KIND_FIELDS = ("kv_heads", "kv_latent", "q_latent", "rope_dim", "rank", "residual_init", "lrkv_impl", "residual_rope")
DECODE_BACKENDS = ("auto", "torch", "triton")


@dataclass
class ModelConfig:
    name: str = "custom"
    attention: str = "mha"  # mha | gqa | mqa | mla | lrkv (see lrkv.attention.KINDS)

    # shape
    n_layer: int = 12
    n_head: int = 6
    d_model: int = 768
    head_dim: int = 128
    vocab_size: int = 50304
    max_seq_len: int = 2048
    mlp_ratio: float = 4.0

    # block choices (paper / nanochat defaults)
    mlp_act: str = "relu2"  # relu2 | gelu | silu | swiglu
    norm_eps: float = 1e-6
    norm_affine: bool = False  # learnable RMSNorm weights (nanochat: none)
    embed_norm: bool = True  # RMSNorm right after the token embedding
    qk_norm: bool = True  # RMSNorm of q and k per head (applied before RoPE)
    rope_theta: float = 10000.0
    logit_softcap: float | None = 15.0  # 15*tanh(z/15); None or 0 disables
    tie_embeddings: bool = False
    zero_init_out: bool = True  # zero-init attention/MLP output projections and the LM head
    attn_backend: str = "auto"  # auto (flash-attn when installed and usable, else SDPA) | sdpa | flash

    # kind-specific (None = the kind's default; see the module docstring)
    kv_heads: int | None = None  # gqa: G key/value heads (mha: H, mqa: 1)
    kv_latent: int | None = None  # mla: d_c
    q_latent: int | None = None  # mla: low-rank query latent (0 = full-rank queries)
    rope_dim: int | None = None  # mla: decoupled RoPE key dim d_r (DeepSeek: 64)
    rank: int | None = None  # lrkv: r, rank of each head's residual
    residual_init: float | None = None  # lrkv: ||U B^T|| / ||W_shared|| at init (paper: 0.1)
    lrkv_impl: str | None = None  # lrkv: "factored" (X.U then .B^T) | "folded" (W_shared + U B^T)
    attn_options: dict = field(default_factory=dict)  # free options for kinds added later
    # decoding (docs/design-notes.md §16)
    decode_backend: str = "auto"  # auto (triton on CUDA when importable, else torch) | torch | triton (exact lrkv)
    residual_rope: bool | None = None  # lrkv: true = the paper's model; false = decoupled RoPE (a different model)

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; fill the kind's defaults. Raises ConfigError with a one-line message."""
        from lrkv.attention import get_attention_class  # late import: attention imports config

        positive = ("n_layer", "n_head", "d_model", "head_dim", "vocab_size", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.mlp_act not in ("relu2", "gelu", "silu", "swiglu"):
            raise ConfigError(f"model.mlp_act={self.mlp_act!r} is unknown; use relu2, gelu, silu or swiglu")
        if self.attn_backend not in ("auto", "sdpa", "flash"):
            raise ConfigError(f"model.attn_backend={self.attn_backend!r} is unknown; use auto, sdpa or flash")
        if self.logit_softcap is not None and self.logit_softcap < 0:
            raise ConfigError(f"model.logit_softcap must be >= 0 or null, got {self.logit_softcap}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.decode_backend not in DECODE_BACKENDS:
            raise ConfigError(
                f"model.decode_backend={self.decode_backend!r} is unknown; use {', '.join(DECODE_BACKENDS)}"
            )
        cls = get_attention_class(self.attention)
        foreign = [f for f in KIND_FIELDS if f not in cls.fields and getattr(self, f) is not None]
        if foreign:
            raise ConfigError(
                f"model.{foreign[0]} is not used by attention={self.attention!r} "
                f"(its fields: {', '.join(cls.fields) or 'none'}); remove it or pick another kind"
            )
        cls.validate(self)
        if self.decode_backend == "triton" and not cls.has_triton_decode(self):
            raise ConfigError(
                f"model.decode_backend=triton has a kernel only for attention=lrkv with residual_rope=true, "
                f"not attention={self.attention!r}; use decode_backend=auto or torch"
            )

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    def kv_cache_elements_per_token(self) -> int:
        """Analytic KV-cache elements per token, summed over all layers."""
        from lrkv.attention import get_attention_class

        cls = get_attention_class(self.attention)
        return sum(cls.layer_cache_elements(self, layer) for layer in range(self.n_layer))

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Analytic KV-cache bytes per token: elements x layers x bytes(dtype)."""
        return self.kv_cache_elements_per_token() * torch.empty((), dtype=dtype).element_size()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **overrides) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


# ---- presets ------------------------------------------------------------------------------------
def config_dir() -> Path:
    """The repository's `configs/` folder (override with the LRKV_CONFIG_DIR environment variable)."""
    env = os.environ.get("LRKV_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def read_preset(path: Path) -> dict[str, Any]:
    """A preset file's fields with its Hydra defaults list applied, as Hydra composes `model=<name>`.

    Presets are composed from a size and a kind (`defaults: [size@_here_: 1b, kind@_here_: lrkv, _self_]`):
    each entry `group@_here_: option` reads `<folder>/<group>/<option>.yaml` into the same level, in order, and
    `_self_` places the file's own fields (last when not listed, as in Hydra).
    """
    data = yaml.safe_load(path.read_text()) or {}
    defaults = data.pop("defaults", None) or []
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out: dict[str, Any] = {}
    for entry in defaults:
        if entry == "_self_":
            out.update(data)
            continue
        (group, option), *_ = entry.items() if isinstance(entry, dict) else [(entry, None)]
        group = group.split("@")[0]
        out.update(read_preset(path.parent / group / f"{option}.yaml"))
    return out


def load_model_config(name: str, **overrides) -> ModelConfig:
    """Read preset `configs/model/<name>.yaml` and apply field overrides: `load_model_config("lrkv_1b", rank=32)`."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        presets = list_presets()
        hint = ", ".join(presets) if presets else f"none found in {config_dir() / 'model'}"
        raise ConfigError(f"unknown model preset {name!r}; available: {hint}")
    data = read_preset(path)
    data.update(overrides)
    return ModelConfig.from_dict(data)
