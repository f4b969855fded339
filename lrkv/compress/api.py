"""compress_model: calibrate, fit bases (EigenAttention or StiefAttention), allocate ranks, fold.

    compressed, report = compress_model(model, batches, method="stief", budget=0.6)
    compressed, report = compress_model(model, batches, method="eigen")            # paper's threshold search
    compressed, report = compress_model(model, batches, method="eigen", budget=0.6) # SVD profiles + allocator
    compressed, report = compress_model(model, batches, method="stief", k_ranks=16, v_ranks=[12, 16, 16, 20])

Modes: explicit `k_ranks` and `v_ranks` fix the ranks (a budget is then ignored); otherwise a
`budget` allocates ranks from the per-layer error-rank profiles; EigenAttention without a budget
runs its per-layer threshold search. The options mirror configs/compress/{eigen,stief}.yaml.

Calibration sequences are split: the last `eval_fraction` of them are held out; the bases are fitted
on the rest (StiefAttention holds out another stief.val_fraction of those for early stopping), and
the profiles, reported layer errors and losses are measured on the held-out ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrkv.data.utils import atomic_write
from lrkv.errors import ConfigError
from lrkv.training.checkpoint import save_pretrained

from .allocate import ALLOCATORS, allocate_ranks, check_budget, check_feasible, rank_grid
from .build import build_compressed
from .calibration import Calibration, calibrate, calibration_batches
from .eigen import EigenOptions, eigen_bases, threshold_search
from .layer import block_error, check_source, kv_statistics
from .profiles import layer_profile, plot_profiles, save_profiles
from .stief import StiefOptions, stief_bases

REPORT_FILE, PROFILES_FILE, PLOT_FILE = "compression_report.json", "profiles.json", "profiles.png"


@dataclass
class CompressConfig:
    method: str = "stief"  # stief | eigen
    budget: float | None = None  # fraction of the source KV cache to keep; eigen: None = threshold search
    budgets: list[float] | None = None  # evaluate.py / compress_sweep: one model per budget (compress_model ignores it)
    allocator: str = "sequential"  # pareto (v1) | sequential (v2)
    k_ranks: int | list[int] | None = None  # fixed ranks (both given): no allocation
    v_ranks: int | list[int] | None = None
    rank_fractions: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    max_tokens: int = 128 * 2048  # calibration tokens kept (whole sequences)
    eval_fraction: float = 0.1  # calibration sequences held out for profiles and reported errors
    chunk_rows: int = 8  # sequences per forward when streaming activations
    calib: dict = field(
        default_factory=dict
    )  # calibration_batches options (source, n_seqs, seq_len, batch_size, split)
    stief: dict = field(default_factory=dict)  # StiefOptions
    eigen: dict = field(default_factory=dict)  # EigenOptions
    pareto: dict = field(default_factory=dict)  # early, late, edge_fraction (layer_weights)

    @classmethod
    def from_dict(cls, options: dict) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown compress option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        cfg = cls(**options)
        if cfg.method not in ("stief", "eigen"):
            raise ConfigError(f"compress.method={cfg.method!r} is unknown; use stief or eigen")
        if cfg.allocator not in ALLOCATORS:
            raise ConfigError(f"compress.allocator={cfg.allocator!r} is unknown; use pareto (v1) or sequential (v2)")
        if (cfg.k_ranks is None) != (cfg.v_ranks is None):
            raise ConfigError(
                "give both compress.k_ranks and compress.v_ranks (or neither, to allocate from compress.budget)"
            )
        if cfg.k_ranks is None:
            if cfg.budget is None and cfg.method == "stief":
                raise ConfigError(
                    "compress.budget is required for method=stief (e.g. 0.6), or give compress.k_ranks and v_ranks"
                )
            if cfg.budget is not None:
                check_budget(cfg.budget)
        if not 0 < cfg.eval_fraction < 1:
            raise ConfigError(f"compress.eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
        calib_names = set(inspect.signature(calibration_batches).parameters) - {"tokenizer"}
        for name, sub, names in (
            ("stief", cfg.stief, {f.name for f in dataclasses.fields(StiefOptions)}),
            ("eigen", cfg.eigen, {f.name for f in dataclasses.fields(EigenOptions)}),
            ("pareto", cfg.pareto, {"early", "late", "edge_fraction"}),
            ("calib", cfg.calib, calib_names),
        ):
            bad = sorted(set(sub or {}) - names)
            if bad:
                raise ConfigError(f"unknown option compress.{name}.{bad[0]}; known: {', '.join(sorted(names))}")
        StiefOptions(**(cfg.stief or {})), EigenOptions(**(cfg.eigen or {}))  # their own range checks, before any work
        return cfg

    @property
    def mode(self) -> str:
        """ranks (fixed), allocate (budget) or threshold (EigenAttention's search)."""
        if self.k_ranks is not None:
            return "ranks"
        return "allocate" if self.budget is not None else "threshold"


def fixed_ranks(value, name: str, n_layer: int, head_dim: int) -> list[int]:
    """compress.k_ranks / v_ranks as n_layer ints in [1, head_dim]; one-line ConfigError otherwise."""
    ranks = [value] * n_layer if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ranks, (list, tuple)) or len(ranks) != n_layer:
        raise ConfigError(f"compress.{name} must be one int or a list of n_layer={n_layer} ints, got {value!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= head_dim:
            raise ConfigError(
                f"compress.{name} has rank {r!r} outside [1, head_dim={head_dim}]; use ranks in that range"
            )
    return list(ranks)


def compress_model(model, calib_batches=None, *, tokenizer=None, out_dir: str | Path | None = None, **options):
    """Compress a full-attention Transformer's KV cache; returns (compressed Transformer, report dict).

    calib_batches: iterable of LongTensor (B, T) token batches (or dicts with "input"); None builds them
    with calibration_batches(tokenizer, **options["calib"]) (seq_len defaults to model.max_seq_len).
    options: see CompressConfig. out_dir: also write compression_report.json, profiles.json and profiles.png.
    Equivalent to fit_compression(...).compress(out_dir=out_dir).
    """
    return fit_compression(model, calib_batches, tokenizer=tokenizer, **options).compress(out_dir=out_dir)


def fit_compression(model, calib_batches=None, *, tokenizer=None, **options) -> CompressionFit:
    """Calibrate and fit one method's bases and error-rank profiles (the expensive part), for any budget."""
    start = time.time()
    cfg = CompressConfig.from_dict(options)
    check_source(model)
    model.eval()
    mcfg = model.cfg
    dh, g, n_layer = mcfg.head_dim, mcfg.kv_heads or mcfg.n_head, mcfg.n_layer
    fixed = None
    if cfg.mode == "ranks":
        fixed = fixed_ranks(cfg.k_ranks, "k_ranks", n_layer, dh), fixed_ranks(cfg.v_ranks, "v_ranks", n_layer, dh)
    grid = rank_grid(dh, cfg.rank_fractions)
    if cfg.mode == "allocate":
        check_feasible(cfg.budget, grid, dh, n_layer)
    if calib_batches is None:
        if tokenizer is None:
            raise ConfigError("compress_model needs calibration batches or a tokenizer to build them (compress.calib)")
        given = {k: v for k, v in (cfg.calib or {}).items() if v is not None}
        calib_batches = calibration_batches(tokenizer, **{"seq_len": mcfg.max_seq_len, **given})
    calib = calibrate(model, calib_batches, cfg.max_tokens, cfg.chunk_rows)
    n = calib.num_sequences
    n_eval = max(1, round(cfg.eval_fraction * n))
    if n - n_eval < (3 if cfg.method == "stief" else 1):
        raise ConfigError(
            f"{n} calibration sequences are too few to hold out {n_eval}; raise compress.calib.n_seqs or max_tokens"
        )
    stief_opts, eigen_opts = StiefOptions(**(cfg.stief or {})), EigenOptions(**(cfg.eigen or {}))

    fit = CompressionFit(
        model,
        cfg,
        calib.tokens[n - n_eval :],
        {"sequences": n, "seq_len": calib.seq_len, "fit_sequences": n - n_eval, "eval_sequences": n_eval},
    )
    profile_layers = []
    for layer, x, y in calib.layers():
        block = model.blocks[layer]
        x_fit, y_fit, x_eval, y_eval = x[: n - n_eval], y[: n - n_eval], x[n - n_eval :], y[n - n_eval :]
        stats = kv_statistics(block, x_fit, cfg.chunk_rows)
        bases = eigen_bases(stats)
        if cfg.method == "eigen" and cfg.mode == "threshold":
            fit.searches.append(
                {"layer": layer, **threshold_search(block, x_fit, y_fit, bases, eigen_opts, cfg.chunk_rows)}
            )
        if cfg.method == "stief":
            k_train, v_train = ([fixed[0][layer]], [fixed[1][layer]]) if fixed else (grid, grid)
            bases = stief_bases(block, x_fit, y_fit, stats, bases, k_train, v_train, stief_opts)
            fit.training.append({"layer": layer, **bases.info})
        if not fixed:
            profile_layers.append({"layer": layer, **layer_profile(block, x_eval, y_eval, bases, grid, cfg.chunk_rows)})
        fit.bases.append(bases)
    if profile_layers:
        fit.profiles = {
            "method": cfg.method,
            "source": mcfg.name,
            "head_dim": dh,
            "kv_heads": g,
            "n_layer": n_layer,
            "ranks": grid,
            "eval_sequences": n_eval,
            "layers": profile_layers,
        }
    fit.seconds = time.time() - start
    return fit


class CompressionFit:
    """Bases (per layer, key(r) / value(r)) and profiles of one method on one model.

    `compress()` folds them at the ranks the fit was configured for; `compress(budget=b)` allocates
    ranks for another budget from the same profiles without refitting (not for fixed-rank StiefAttention
    fits, whose bases exist at the given ranks only).
    """

    def __init__(self, model, cfg: CompressConfig, held_out_tokens: torch.Tensor, calibration: dict):
        self.model, self.cfg, self.held_out_tokens, self.calibration = model, cfg, held_out_tokens, calibration
        self.bases: list = []
        self.profiles: dict | None = None
        self.searches: list[dict] = []  # EigenAttention threshold search, per layer
        self.training: list[dict] = []  # StiefAttention training summaries, per layer
        self.seconds = 0.0

    def ranks(self, budget=None, allocator=None) -> tuple[list[int], list[int]]:
        cfg, mcfg = self.cfg, self.model.cfg
        if budget is None and cfg.mode == "ranks":
            return (
                fixed_ranks(cfg.k_ranks, "k_ranks", mcfg.n_layer, mcfg.head_dim),
                fixed_ranks(cfg.v_ranks, "v_ranks", mcfg.n_layer, mcfg.head_dim),
            )
        if budget is None and cfg.mode == "threshold":
            return [s["k_rank"] for s in self.searches], [s["v_rank"] for s in self.searches]
        if self.profiles is None:
            raise ConfigError(
                "this fit has fixed-rank StiefAttention bases only; fit again with compress.budget to allocate"
            )
        allocation = allocate_ranks(
            self.profiles,
            budget if budget is not None else cfg.budget,
            allocator or cfg.allocator,
            **(cfg.pareto or {}),
        )
        return allocation.k_ranks, allocation.v_ranks

    def compress(self, budget: float | None = None, allocator: str | None = None, out_dir: str | Path | None = None):
        """(compressed Transformer, report) at the fit's own ranks, or allocated for `budget`."""
        start = time.time()
        cfg, model, mcfg = self.cfg, self.model, self.model.cfg
        k_ranks, v_ranks = self.ranks(budget, allocator)
        mode = "allocate" if budget is not None else cfg.mode
        budget = budget if budget is not None else cfg.budget
        allocator = allocator or cfg.allocator
        kv_ratio = (sum(k_ranks) + sum(v_ranks)) / (2 * mcfg.n_layer * mcfg.head_dim)
        meta = {"method": cfg.method, "source": mcfg.name, "kv_ratio": kv_ratio}
        if mode == "allocate":
            meta.update(budget=budget, allocator=allocator)
        k_bases = [b.key(r) for b, r in zip(self.bases, k_ranks)]
        v_bases = [b.value(r) for b, r in zip(self.bases, v_ranks)]
        compressed = build_compressed(model, k_bases, v_bases, meta)

        held_out = Calibration(model, self.held_out_tokens, cfg.chunk_rows)
        layer_errors = []
        for layer, x, y in held_out.layers():
            err = block_error(model.blocks[layer], x, y, k_bases[layer], v_bases[layer], cfg.chunk_rows)
            layer_errors.append(
                {
                    "layer": layer,
                    "k_rank": k_ranks[layer],
                    "v_rank": v_ranks[layer],
                    "rel_error": err.rel_error,
                    "cosine": err.cosine,
                }
            )
        report = {
            "method": cfg.method,
            "mode": mode,
            "source": mcfg.name,
            "name": compressed.cfg.name,
            "budget": budget if mode == "allocate" else None,
            "allocator": allocator if mode == "allocate" else None,
            "kv_ratio": kv_ratio,
            "k_ranks": k_ranks,
            "v_ranks": v_ranks,
            "kv_bytes_per_token_bf16": {
                "source": mcfg.kv_cache_bytes_per_token(),
                "compressed": compressed.cfg.kv_cache_bytes_per_token(),
            },
            "calibration": self.calibration,
            "held_out_loss": held_out_losses(model, compressed, self.held_out_tokens, cfg.chunk_rows),
            "layer_errors": layer_errors,
            "threshold_search": self.searches or None,
            "stief_training": self.training or None,
            "options": dataclasses.asdict(cfg),
            "profiles": self.profiles,
            "seconds": {"fit": self.seconds, "compress": time.time() - start},
        }
        if out_dir is not None:
            write_report(report, out_dir)
        return compressed, report


def compress_sweep(
    model,
    calib_batches=None,
    *,
    methods=("eigen", "stief"),
    budgets=(0.5, 0.6, 0.7, 0.8, 0.9),
    out_dir: str | Path,
    tokenizer=None,
    **options,
) -> list[dict]:
    """Fit each method once, then compress at every budget into out_dir/<method>_<budget>/ (save_compressed).

    Returns one summary per compressed model: method, budget, kv_ratio, held-out calibration losses, folder.
    options: CompressConfig fields shared by the methods; per-method dicts go in options["stief"] etc.
    """
    batches = None if calib_batches is None else list(calib_batches)
    out, rows = Path(out_dir), []
    for method in methods:
        budget = options.get("budget") or max(budgets)  # any feasible budget: the fit itself is budget-free
        fit = fit_compression(model, batches, tokenizer=tokenizer, **{**options, "method": method, "budget": budget})
        for b in budgets:
            compressed, report = fit.compress(budget=b)
            folder = save_compressed(compressed, out / f"{method}_{b:g}", report, tokenizer)
            rows.append(
                {
                    "method": method,
                    "budget": b,
                    "kv_ratio": report["kv_ratio"],
                    "name": report["name"],
                    "held_out_loss": report["held_out_loss"],
                    "folder": str(folder),
                }
            )
    return rows


@torch.no_grad()
def held_out_losses(model, compressed, tokens: torch.Tensor, chunk_rows: int = 8) -> dict:
    """Next-token cross-entropy (nats) of both models on the held-out calibration sequences."""
    device = model.embed.weight.device
    out = {}
    for name, m in (("source", model), ("compressed", compressed)):
        total = count = 0.0
        for rows in tokens.split(chunk_rows):
            rows = rows.to(device)
            total += float(m.loss(rows[:, :-1], rows[:, 1:], reduction="sum"))
            count += rows[:, 1:].numel()
        out[name] = total / count
    return out


def write_report(report: dict, out_dir: str | Path) -> Path:
    """compression_report.json (without profiles), profiles.json and profiles.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = report.get("profiles")
    atomic_write(str(out_dir / REPORT_FILE), json.dumps({k: v for k, v in report.items() if k != "profiles"}, indent=1))
    if profiles:
        save_profiles(profiles, out_dir / PROFILES_FILE)
        plot_profiles(profiles, out_dir / PLOT_FILE)
    return out_dir


def save_compressed(model, folder: str | Path, report: dict | None = None, tokenizer=None) -> Path:
    """save_pretrained (model_config.json, model.safetensors, tokenizer.json) plus the compression report."""
    folder = save_pretrained(model, folder, tokenizer)
    if report is not None:
        write_report(report, folder)
    return folder
