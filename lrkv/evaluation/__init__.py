"""Evaluation: held-out loss and bits-per-byte, lm-eval model, KV footprint, run comparison, head
diversity, sampling. `python evaluate.py mode=NAME` is the entry point (see configs/evaluate.yaml).

Modules (import what you need; none imports Hydra):
    modes        one function per `evaluate.py mode=NAME`, the registry MODES and run(config)
    loss         cross-entropy, perplexity, bits-per-byte on a data split
    lm_eval_model  the lm-eval LM registered as "lrkv" (registered when this package is imported)
    downstream   run lm-eval tasks on a checkpoint, write/print results
    footprint    KV-cache bytes of presets, measured from meta-device caches
    compare      tables and plots over training runs (loss curves, Pareto, steps to target)
    diversity    effective rank of per-head W_Q,h W_K,hᵀ (paper's head-diversity diagnostic)
    sample       decoding through the KV cache with stop tests and tokens/s
    compression  compress trained checkpoints and score them like trained runs
    report       table/CSV/JSON helpers
Loading checkpoints and reading run folders is lrkv.io's (lrkv.load_pretrained).
"""

try:  # registers the lm-eval model "lrkv"; lm-eval is a dependency, but keep the rest usable without it
    from lrkv.evaluation import lm_eval_model  # noqa: F401
except ImportError as _e:  # pragma: no cover - only without lm-eval installed
    if "lm_eval" not in str(_e):
        raise
