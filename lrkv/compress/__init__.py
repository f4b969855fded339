"""Post-training KV-cache compression of full-attention models: EigenAttention and StiefAttention.

A trained MHA/GQA model (ours, or a local Hugging Face Llama folder via `lrkv.load_pretrained`) keeps its
weights; each layer's pre-RoPE keys and values are projected onto low-rank orthonormal bases and
only the projections are cached (docs/design-notes.md §6). The result is an ordinary `lrkv.Transformer` of
attention kind "compressed_kv" (lrkv/attention/compressed.py), so saving, loading, generation,
footprint and every evaluation work on it unchanged.

    from lrkv.compress import calibration_batches, compress_model, save_compressed
    batches = calibration_batches(tokenizer, source="embedded", n_seqs=128, seq_len=512)
    compressed, report = compress_model(model, batches, method="stief", budget=0.6)
    save_compressed(compressed, "out/stief60", report, tokenizer)

    fit = fit_compression(model, batches, method="stief", budget=0.6)   # bases + profiles, once
    for b in (0.5, 0.7, 0.9): compressed, report = fit.compress(budget=b) # any budget, no refit
    compress_sweep(model, batches, methods=("eigen", "stief"), budgets=(0.5, 0.7), out_dir="out/sweep")

Pieces, usable alone:
    calibrate(model, batches, max_tokens) -> Calibration     per-layer block inputs, streamed
    eigen_bases / threshold_search                            EigenAttention
    stief_bases / train_basis                                 StiefAttention
    layer_profile, save_profiles, plot_profiles               error-rank profiles (JSON, PNG)
    allocate_ranks(profiles, budget, method)                  "pareto" (v1) | "sequential" (v2)
    build_compressed(model, k_bases, v_bases)                 fold bases into a compressed Transformer
    projected_logits(model, tokens, k_bases, v_bases)         the unfolded reference
"""

from .allocate import Allocation, allocate_ranks, layer_weights, rank_grid
from .api import (
    CompressConfig,
    CompressionFit,
    compress_model,
    compress_sweep,
    fit_compression,
    save_compressed,
    write_report,
)
from .build import build_compressed, projected_logits
from .calibration import Calibration, calibrate, calibration_batches
from .eigen import EigenBases, EigenOptions, eigen_bases, threshold_rank, threshold_search
from .layer import block_error, check_source, kv_statistics, projected_block
from .profiles import layer_profile, load_profiles, plot_profiles, save_profiles
from .stief import LearnedBases, StiefOptions, stief_bases, train_basis

__all__ = [
    "Allocation",
    "Calibration",
    "CompressConfig",
    "CompressionFit",
    "compress_sweep",
    "fit_compression",
    "EigenBases",
    "EigenOptions",
    "LearnedBases",
    "StiefOptions",
    "allocate_ranks",
    "block_error",
    "build_compressed",
    "calibrate",
    "calibration_batches",
    "check_source",
    "compress_model",
    "eigen_bases",
    "kv_statistics",
    "layer_profile",
    "layer_weights",
    "load_profiles",
    "plot_profiles",
    "projected_block",
    "projected_logits",
    "rank_grid",
    "save_compressed",
    "save_profiles",
    "stief_bases",
    "threshold_rank",
    "threshold_search",
    "train_basis",
    "write_report",
]
