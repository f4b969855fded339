"""The decoder-only Transformer (nanochat-style pre-norm baseline) with a pluggable attention kind.

    x = norm(embed(tokens))
    for each block:  x = x + attn(norm(x), cache, positions);  x = x + mlp(norm(x))
    logits = softcap(lm_head(norm(x)))

Model code imports neither Lightning nor Hydra. Build on the meta device to count parameters of
big presets for free; `init_weights()` initialises (again) after `to_empty()` (FSDP flow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrkv.attention import get_attention_class, init_linear_
from lrkv.cache import KVCache
from lrkv.config import ModelConfig
from lrkv.errors import ConfigError
from lrkv.norm import RMSNorm


class MLP(nn.Module):
    """d -> hidden -> d with ReLU^2 (paper), GELU, SiLU, or SwiGLU (gate and up in one matrix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.mlp_act
        up_out = 2 * cfg.mlp_hidden if self.act == "swiglu" else cfg.mlp_hidden
        self.up = nn.Linear(cfg.d_model, up_out, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        h = self.up(x)
        if self.act == "relu2":
            h = F.relu(h).square()
        elif self.act == "gelu":
            h = F.gelu(h)
        elif self.act == "silu":
            h = F.silu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.attn = get_attention_class(cfg.attention)(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, positions=None):
        x = x + self.attn(self.attn_norm(x), cache, positions)
        return x + self.mlp(self.mlp_norm(x))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Attention's own init; MLP up normal, down zero (or normal); norm weights ones."""
        self.attn_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.reset_parameters()
        init_linear_(self.mlp.up.weight)
        if self.attn.cfg.zero_init_out:
            nn.init.zeros_(self.mlp.down.weight)
        else:
            init_linear_(self.mlp.down.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward (training only)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    # ---- init -------------------------------------------------------------------------------
    def init_plan(self) -> list[tuple[list[nn.Module], Callable[[], None]]]:
        """Independent parts of the model and their init functions, in a fixed order.

        `init_weights(seed)` seeds part i with seed + i, so a part can be materialised and initialised
        on its own (FSDP builds block by block) and still equal the single-process model exactly.
        """
        plan = [([self.embed, self.embed_norm], self._init_embedding)]
        plan += [([block], block.reset_parameters) for block in self.blocks]
        plan += [([self.norm] + ([self.lm_head] if self.lm_head is not None else []), self._init_head)]
        return plan

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every part (see init_plan); with a seed, independent of the global RNG."""
        for i, (_, init) in enumerate(self.init_plan()):
            seeded(init, None if seed is None else seed + i)

    def _init_embedding(self) -> None:
        """Embedding N(0, 1) as in nanochat (N(0, 0.02) when tied to the LM head)."""
        nn.init.normal_(self.embed.weight, std=0.02 if self.cfg.tie_embeddings else 1.0)
        if isinstance(self.embed_norm, RMSNorm):
            self.embed_norm.reset_parameters()

    def _init_head(self) -> None:
        """LM head zero (nanochat) or normal, final norm ones."""
        self.norm.reset_parameters()
        if self.lm_head is not None:
            if self.cfg.zero_init_out:
                nn.init.zeros_(self.lm_head.weight)
            else:
                init_linear_(self.lm_head.weight)

    # ---- forward ----------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None):
        """Final normalised hidden states (B, T, d)."""
        if tokens.dim() != 2:
            raise ConfigError(f"tokens must have shape (batch, time), got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            if start + t > self.cfg.max_seq_len:
                raise ConfigError(
                    f"sequence of {start + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                    "shorten the input or raise max_seq_len"
                )
            positions = torch.arange(start, start + t, device=tokens.device)
        x = self.embed_norm(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, None, positions, use_reentrant=False)
            else:
                x = block(x, cache.layers[i] if cache is not None else None, positions)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in at least float32, soft-capped: cap * tanh(z / cap)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, weight)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(z / cap) if cap else z

    def forward(self, tokens, cache: KVCache | None = None, positions: torch.Tensor | None = None):
        """(B, T) token ids -> (B, T, vocab) float32 logits. With a cache, appends and continues its positions."""
        return self.logits(self.hidden(tokens, cache, positions))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy (nats) of next-token targets (B, T); target -1 is ignored.

        The mean is over the targets that are not ignored; a batch with none (a chat window with no
        assistant token) gives 0 and zero gradients instead of NaN.
        """
        logits = self(tokens)
        flat = targets.flatten()
        if reduction != "mean":
            return F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-1, reduction=reduction)
        total = F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-1, reduction="sum")
        return total / (flat >= 0).sum().clamp_min(1)

    # ---- KV cache and generation ------------------------------------------------------------
    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens (default: max_seq_len)."""
        max_len = max_len or self.cfg.max_seq_len
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return KVCache([block.attn.new_cache(batch_size, max_len, device, dtype) for block in self.blocks])

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor | list[torch.Tensor],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        cache_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Continue prompts (B, T) (or (T,)) by up to max_new_tokens; greedy when temperature == 0.

        Rows that emit `stop_token` keep emitting it; generation ends when all rows have stopped.
        Returns prompt + new tokens. use_cache=False recomputes the whole sequence every step (reference).

        A list of 1-D prompts of different lengths returns a list: element i is what generate(prompt[i])
        returns alone (its prompt, then its new tokens up to and including its stop token), all rows in one
        batch and one cache: the common prompt length is prefilled, then longer prompts feed their own
        tokens while shorter ones already generate (no padding is attended).
        """
        from lrkv.generate import generate_batch

        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_token=stop_token, generator=generator)
        opts.update(use_cache=use_cache, cache_dtype=cache_dtype)
        if isinstance(prompt, (list, tuple)):
            return self.generate_ragged(list(prompt), max_new_tokens, opts)
        squeeze = prompt.dim() == 1
        tokens = generate_batch(self, prompt[None] if squeeze else prompt, max_new_tokens, **opts).tokens
        return tokens[0] if squeeze else tokens

    def generate_ragged(self, prompts: list[torch.Tensor], max_new_tokens: int, opts: dict) -> list[torch.Tensor]:
        """generate() for a list of 1-D prompts: one batch and one cache (lrkv.generate.generate_batch), cut per row."""
        from lrkv.generate import generate_batch

        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0:
                raise ConfigError(
                    f"prompt {i} must be a non-empty 1-D tensor of token ids, got {getattr(p, 'shape', p)}"
                )
        gen = generate_batch(self, prompts, max_new_tokens, **opts)
        out = []
        for i, p in enumerate(prompts):
            new = gen.new_tokens[i] + ([opts["stop_token"]] if gen.stop_hit[i] else [])
            out.append(torch.cat([p, p.new_tensor(new, dtype=p.dtype)]))
        return out

    # ---- accounting -------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding=True excludes the token embedding table (the LM head counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head is not None:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N_matmul + 6 L H (d_qk + d_v) T (attention, causal counted in full).

        For d_qk = d_v = d_h this is docs/design-notes.md §7: 6 (N - N_embedding) + 12 L H d_h T.
        """
        t = seq_len or self.cfg.max_seq_len
        d_qk, d_v = get_attention_class(self.cfg.attention).score_dims(self.cfg)
        return 6 * self.num_params(non_embedding=True) + 6 * self.cfg.n_layer * self.cfg.n_head * (d_qk + d_v) * t


def seeded(fn: Callable[[], None], seed: int | None) -> None:
    """Run fn with the CPU RNG seeded (and restored afterwards); plain call when seed is None."""
    if seed is None:
        fn()
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fn()


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and non-embedding parameters of a config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True)}
