"""Per-layer error-vs-rank profiles: measured, saved as JSON, plotted.

A profile holds, for every layer and every candidate rank r, the error of the decoder block output
on held-out calibration sequences when

    "k":  only the keys are projected (rank r),
    "v":  only the values are projected (rank r),
    "kv": both are projected at rank r,

each as relative Frobenius error ||Y' - Y||_F / ||Y||_F and mean token cosine similarity. The rank
allocator reads "k" and "v"; "kv" is what a layer with r_K = r_V = r does.

    {"method": "stief", "source": "mha_tiny", "head_dim": 32, "kv_heads": 4, "n_layer": 4,
     "ranks": [16, 19, 22, 26, 29, 32],
     "layers": [{"layer": 0, "k": {"rel_error": [...], "cosine": [...]}, "v": {...}, "kv": {...}}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path

from lrkv.data.utils import atomic_write

from .layer import block_error

PARTS = ("k", "v", "kv")


def layer_profile(block, x, y, bases, ranks: list[int], chunk_rows: int = 8) -> dict:
    """Errors of one block at each rank (see the module docstring); bases has key(r) and value(r)."""
    out = {part: {"rel_error": [], "cosine": []} for part in PARTS}
    for r in ranks:
        pk, pv = bases.key(r), bases.value(r)
        for part, (k, v) in zip(PARTS, ((pk, None), (None, pv), (pk, pv))):
            err = block_error(block, x, y, k, v, chunk_rows)
            out[part]["rel_error"].append(err.rel_error)
            out[part]["cosine"].append(err.cosine)
    return out


def save_profiles(profiles: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(str(path), json.dumps(profiles, indent=1))
    return path


def load_profiles(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def plot_profiles(profiles: dict, path: str | Path) -> Path:
    """PNG: relative error (top) and cosine similarity (bottom) vs rank, keys / values / both, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = profiles["ranks"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    cmap = plt.get_cmap("viridis")
    n = max(len(profiles["layers"]) - 1, 1)
    for col, part in enumerate(PARTS):
        for entry in profiles["layers"]:
            color = cmap(entry["layer"] / n)
            axes[0, col].plot(
                ranks, entry[part]["rel_error"], marker="o", ms=3, color=color, label=f"layer {entry['layer']}"
            )
            axes[1, col].plot(ranks, entry[part]["cosine"], marker="o", ms=3, color=color)
        title = {"k": "keys projected", "v": "values projected", "kv": "keys and values projected"}[part]
        axes[0, col].set_title(title)
        axes[0, col].set_yscale("symlog", linthresh=1e-4)
        axes[1, col].set_xlabel("rank")
    axes[0, 0].set_ylabel("relative error of block output")
    axes[1, 0].set_ylabel("mean token cosine similarity")
    if len(profiles["layers"]) <= 16:
        axes[0, 2].legend(fontsize=7)
    fig.suptitle(
        f"{profiles['method']} error-rank profiles of {profiles.get('source', 'model')} (d_h = {profiles['head_dim']})"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
