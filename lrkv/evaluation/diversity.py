"""Head diversity (LRKV paper, docs/design-notes.md §5): effective rank of the heads' query-key maps, per layer.

For head h the attention score before norms and RoPE is the bilinear form x_i A_h x_jᵀ with

    A_h = W_Q,h W_K,hᵀ   (d × d),   W_Q,h, W_K,h: d × d_h (the maps x -> q_h, x -> k_h)

given by each kind's `Attention.head_qk_maps()` (in its own file), e.g.

    MHA   W_K,h its own key projection;  GQA/MQA  the key projection of h's group
    LRKV  W_K,h = W_K,shared + U_K,h B_K,h  (shared projection plus the head's rank-r residual)
    MLA   the per-head effective key map from the latent: [W_DKV W_UK,hᵀ | W_KR] (d × (d_h + d_r))

Norms are per-token scales and RoPE a position-dependent rotation, so neither enters A_h; learnable
norm weights (`norm_affine`) are folded in as diagonal scales. The Gram matrix of the flattened maps

    G_ij = <A_i, A_j>_F = tr(A_iᵀ A_j) = tr((W_Q,iᵀ W_Q,j)(W_K,jᵀ W_K,i)) = sum((W_Q,iᵀ W_Q,j) ⊙ (W_K,iᵀ W_K,j))

is computed from H² small d_h × d_h products, never forming a d × d matrix. With eigenvalues λ of G,
p = λ / Σλ, the effective rank exp(-Σ p log p) lies in [1, H]: 1 when all heads share one map
(up to scale), H when the maps are orthogonal with equal norms. Reported as % of H.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lrkv.errors import ConfigError
from lrkv.evaluation.report import text_table, write_csv, write_json


def gram_matrix(wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """G_ij = <W_Q,i W_K,iᵀ, W_Q,j W_K,jᵀ>_F from (H, d, e) maps, without forming d × d matrices."""
    m = torch.einsum("ida,jdb->ijab", wq, wq)  # W_Q,iᵀ W_Q,j
    n = torch.einsum("ida,jdb->ijab", wk, wk)  # W_K,iᵀ W_K,j
    return (m * n).sum(dim=(-1, -2))


def effective_rank(gram: torch.Tensor) -> float:
    """exp(entropy of the normalised eigenvalues) of a PSD matrix."""
    lam = torch.linalg.eigvalsh(gram.to(torch.float64)).clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return float("nan")
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def head_diversity(model) -> list[dict]:
    """Per layer: effective rank of the heads' Gram matrix, absolute and as % of H."""
    rows = []
    for i, block in enumerate(model.blocks):
        try:
            wq, wk = block.attn.head_qk_maps()
        except NotImplementedError as err:
            raise ConfigError(f"head diversity: {err}") from None
        erank = effective_rank(gram_matrix(wq, wk))
        h = block.attn.n_head
        rows.append({"layer": i, "heads": h, "effective_rank": erank, "percent_of_heads": 100.0 * erank / h})
    return rows


def diversity_summary(rows: list[dict]) -> dict:
    vals = [r["percent_of_heads"] for r in rows if not math.isnan(r["percent_of_heads"])]
    return {
        "mean_percent": sum(vals) / len(vals) if vals else float("nan"),
        "min_percent": min(vals) if vals else float("nan"),
        "max_percent": max(vals) if vals else float("nan"),
    }


def report_diversity(results: dict[str, dict], out_dir: str | Path | None = None) -> str:
    """results: {name: {"attention", "rows"}} -> per-layer table (one column per model), CSV/JSON/PNG."""
    names = list(results)
    layers = max(len(r["rows"]) for r in results.values())
    table = []
    for layer in range(layers):
        row = {"layer": layer}
        for name in names:
            rs = results[name]["rows"]
            row[name] = rs[layer]["percent_of_heads"] if layer < len(rs) else None
        table.append(row)
    mean = {"layer": "mean"}
    for name in names:
        mean[name] = diversity_summary(results[name]["rows"])["mean_percent"]
    columns = ["layer"] + names
    formats = {n: ".1f" for n in names}
    text = "head diversity: effective rank of the Gram matrix of per-head W_Q,h W_K,hᵀ, % of H\n" + text_table(
        table + [mean], columns, formats
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        flat = [{"model": n, "attention": results[n].get("attention"), **r} for n in names for r in results[n]["rows"]]
        write_csv(
            out_dir / "diversity.csv",
            flat,
            ["model", "attention", "layer", "heads", "effective_rank", "percent_of_heads"],
        )
        write_json(
            out_dir / "diversity.json",
            {n: {**results[n], "summary": diversity_summary(results[n]["rows"])} for n in names},
        )
        plot_diversity(results, out_dir / "diversity.png")
    return text


def plot_diversity(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        rows = res["rows"]
        ax.plot([r["layer"] for r in rows], [r["percent_of_heads"] for r in rows], marker="o", label=name)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank (% of heads)")
    ax.set_ylim(0, 105)
    ax.set_title("head diversity of W_Q,h W_K,hᵀ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
