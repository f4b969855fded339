"""Convert a trained MHA / GQA / MQA (or LRKV) model into an LRKV model of rank r.

    model, report = convert_model(source_model, rank=8, fit="als")      # in memory
    convert_run("outputs/runs/mha", "outputs/mha-lrkv8", rank=8)        # a run: lrkv/evaluation/conversion.py
                                                                        # (python evaluate.py mode=convert ...)

The math. Every head h of the source has key and value projections W_h (d_h x d; for GQA the group's
W_g(h), g(h) = h // (H/G), the head-to-group map of `enable_gqa`; an LRKV source is folded first,
W_h = W_shared + U_h B_h^T). LRKV computes

    k_h = RoPE(norm(x (W_shared + U_h B_h^T)^T)),   v_h = x (W_shared + U_h B_h^T)^T

and GQA computes k_h = RoPE(norm(x W_h^T)), v_h = x W_h^T, with the same per-head QK-norm and the same
RoPE applied *after* the projection in both. So the two layers are the same function exactly when the
folded projections agree, W_shared + B_h^T U_h = W_h for every head (in nn.Linear's (out, in) layout),
and conversion is a per-layer matrix approximation problem, done separately for keys and values:

    min over S, rank-r L_h of  sum_h ||W_h - S - L_h||_F^2,     then L_h = B_h^T U_h

Queries, output projection, norms (QK-norm weights included), MLP, embeddings and head are copied.
At r = d_h every residual W_h - S (d_h x d) has rank <= d_h, both fits below are exact and the
converted model's logits equal the source's (tests/test_convert.py). Below d_h, the error of each
head's projection is what the residual's truncated singular values leave.

Two fits (`fit=`):

    mean_svd   S = mean_h W_h, L_h = the rank-r truncated SVD of W_h - S (one pass).
    als        alternating least squares from mean_svd: S = mean_h (W_h - L_h), L_h = SVD_r(W_h - S),
               repeated until the relative error stops improving (options `iters`=100, `tol`=1e-4). Each step
               is the exact minimiser of one block with the other fixed, so the error never rises,
               and the first step is mean_svd: als is never worse than mean_svd in this objective.

The default is als (measured in docs/post-training.md: lower reconstruction error and lower held-out
loss right after conversion on a trained tiny model, at negligible cost). Factors are split evenly,
B_h^T = P_r S_r^1/2 and U_h = S_r^1/2 Q_r^T from W_h - S = P S Q^T, so U and B have the same scale.

`convert_run` loads the source through the project's loader (pretrained folder, run folder,
Lightning checkpoint, or a local Hugging Face Llama folder), converts, writes a pretrained folder
(model_config.json, model.safetensors, tokenizer.json, plus convert.json and summary.json) and
measures the held-out loss of both models on the source run's validation data (the embedded corpus
when the source is not one of our runs). Continue training with `train.init_from=OUT`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lrkv.config import ModelConfig
from lrkv.errors import CheckpointError, ConfigError
from lrkv.model import Transformer

FITS = ("als", "mean_svd")
DEFAULT_FIT = "als"
SOURCE_KINDS = ("mha", "gqa", "mqa", "lrkv")
TARGETS = ("lrkv",)


# ---- loading and saving: the project's loader, imported in this one place -------------------------------
def load_source(path, device: str = "cpu"):
    """`Pretrained(model, tokenizer, path)` of any checkpoint evaluate.py accepts (float32, eval mode)."""
    from lrkv.io import load_pretrained

    return load_pretrained(path, device, "float32")


def save_folder(model: Transformer, folder: Path, tokenizer) -> Path:
    from lrkv.training.checkpoint import save_pretrained

    return save_pretrained(model, folder, tokenizer)


# ---- the fits: pure functions on (H, d_h, d) stacks of per-head projections -----------------------------
@dataclass
class Factors:
    """W_h ~ shared + b[h]^T u[h]: shared (d_h, d), b (H, r, d_h), u (H, r, d) - LRKV's wk_shared.weight, bk, uk."""

    shared: torch.Tensor
    b: torch.Tensor
    u: torch.Tensor
    iters: int = 1

    def folded(self) -> torch.Tensor:
        """(H, d_h, d): shared + B_h^T U_h, as LowRankKVAttention.folded_weight computes it."""
        return self.shared[None] + torch.einsum("hrd,hre->hde", self.b, self.u)


def truncated(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of each residual (H, d_h, d) in Frobenius norm: b (H, r, d_h), u (H, r, d),
    residual_h ~ b_h^T u_h, with the singular values split evenly between the two factors."""
    h, dh, d = residual.shape
    if rank == 0:
        return residual.new_zeros(h, 0, dh), residual.new_zeros(h, 0, d)
    p, s, qt = torch.linalg.svd(residual, full_matrices=False)  # p (H, d_h, k), s (H, k), qt (H, k, d)
    root = s[:, :rank].sqrt()
    return (p[:, :, :rank] * root[:, None, :]).transpose(1, 2), qt[:, :rank, :] * root[:, :, None]


def relative_error(weights: torch.Tensor, factors: Factors) -> float:
    """||W - folded||_F / ||W||_F over all heads."""
    return float((weights - factors.folded()).norm() / weights.norm().clamp_min(1e-30))


def fit_mean_svd(weights: torch.Tensor, rank: int) -> Factors:
    """shared = mean over heads; each head's residual truncated to rank r by SVD."""
    shared = weights.mean(0)
    b, u = truncated(weights - shared, rank)
    return Factors(shared, b, u, iters=1)


def fit_als(weights: torch.Tensor, rank: int, iters: int = 100, tol: float = 1e-4) -> Factors:
    """Alternating least squares from fit_mean_svd: shared = mean_h (W_h - L_h), then L_h = SVD_r(W_h - shared),
    until the relative error improves by less than `tol` (relative) or after `iters` rounds."""
    factors = fit_mean_svd(weights, rank)
    error = relative_error(weights, factors)
    for step in range(2, iters + 1):
        low = torch.einsum("hrd,hre->hde", factors.b, factors.u)
        shared = (weights - low).mean(0)
        b, u = truncated(weights - shared, rank)
        candidate = Factors(shared, b, u, iters=step)
        new_error = relative_error(weights, candidate)
        if new_error > error:  # round-off at an optimum: keep the better one
            break
        factors, improved = candidate, error - new_error
        error = new_error
        if improved <= tol * max(error, 1e-30):
            break
    return factors


def fit_heads(weights: torch.Tensor, rank: int, fit: str = DEFAULT_FIT, **options) -> Factors:
    """Fit (H, d_h, d) per-head projections with `fit` (see FITS), in float64."""
    check_fit(fit)
    w = weights.detach().to(torch.float64)
    return fit_als(w, rank, **options) if fit == "als" else fit_mean_svd(w, rank)


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ConfigError(f"fit={fit!r} is unknown; use one of {', '.join(FITS)}")


# ---- a model ------------------------------------------------------------------------------------------
def head_projections(attn, which: str) -> torch.Tensor:
    """Per-query-head key ("k") or value ("v") projections (H, d_h, d) of a GQA-family or LRKV layer."""
    h, dh = attn.n_head, attn.head_dim
    kind = attn.cfg.attention
    if kind == "lrkv":
        shared, u, b = (attn.wk_shared, attn.uk, attn.bk) if which == "k" else (attn.wv_shared, attn.uv, attn.bv)
        return attn.folded_weight(shared, u, b).detach().view(h, dh, -1)
    w = (attn.wk if which == "k" else attn.wv).weight.detach()
    groups = w.view(attn.kv_heads, dh, -1)
    return groups.repeat_interleave(h // attn.kv_heads, dim=0)  # head h -> group h // (H / G), as enable_gqa


def check_rank(rank, head_dim: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= head_dim:
        raise ConfigError(f"rank={rank!r} is outside [0, head_dim={head_dim}]; pass rank=R with 0 <= R <= head_dim")
    return rank


def target_config(source: ModelConfig, rank: int, name: str | None = None) -> ModelConfig:
    """The source's config with LRKV attention of rank r (every other field, QK-norm included, unchanged)."""
    if source.attention not in SOURCE_KINDS:
        raise ConfigError(
            f"cannot convert attention={source.attention!r} to lrkv; the source must be one of "
            f"{', '.join(SOURCE_KINDS)} (a model with per-head key/value projections)"
        )
    fields = source.to_dict()
    for key in ("kv_heads", "kv_latent", "q_latent", "rope_dim", "rank", "residual_init", "lrkv_impl"):
        fields[key] = None
    fields.update(attention="lrkv", rank=check_rank(rank, source.head_dim), name=name or f"{source.name}-lrkv{rank}")
    return ModelConfig.from_dict(fields)


@torch.no_grad()
def convert_model(
    source: Transformer, rank: int, fit: str = DEFAULT_FIT, name: str | None = None, **fit_options
) -> tuple[Transformer, dict]:
    """An LRKV Transformer whose per-head K/V projections approximate the source's (exact at rank = head_dim).

    Returns (model in eval mode, report) with per-layer relative Frobenius errors of K and V and the
    ALS rounds used. The source is not modified."""
    check_fit(fit)
    cfg = target_config(source.cfg, rank, name)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    dtype = next(source.parameters()).dtype
    layers = []
    for i, block in enumerate(source.blocks):
        attn, prefix = block.attn, f"blocks.{i}.attn."
        row = {"layer": i}
        for which in ("k", "v"):
            weights = head_projections(attn, which).to(torch.float64)
            factors = fit_heads(weights, rank, fit, **fit_options)
            row[f"{which}_error"] = relative_error(weights, factors)
            row[f"{which}_iters"] = factors.iters
            for key in (f"w{which}.weight", f"w{which}_shared.weight", f"u{which}.weight", f"b{which}"):
                state.pop(prefix + key, None)
            state[prefix + f"w{which}_shared.weight"] = factors.shared.to(dtype)
            state[prefix + f"u{which}.weight"] = factors.u.reshape(-1, cfg.d_model).to(dtype)
            state[prefix + f"b{which}"] = factors.b.to(dtype)
        layers.append(row)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=next(source.parameters()).device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a source layout this module does not know: refuse rather than guess
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"cannot map {source.cfg.name!r} onto LRKV weights ({what})")
    model.to(dtype).eval()
    report = {
        "fit": fit,
        "rank": rank,
        "source_attention": source.cfg.attention,
        "layers": layers,
        "k_error": _mean(layers, "k_error"),
        "v_error": _mean(layers, "v_error"),
    }
    return model, report


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)
