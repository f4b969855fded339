"""Formats and loading: every "what is at this path?" of lrkv is answered here.

Modules (none imports Lightning or Hydra; checkpoint *writing* is lrkv.training's):
    pretrained    the pretrained folder (model_config.json, model.safetensors, tokenizer.json)
    checkpoints   Lightning checkpoint files and sharded FSDP folders written by training; last.ckpt
    hf_llama      local Hugging Face Llama folders (config.json + safetensors) as lrkv Transformers
    runs          training run folders: config, summary.json, metrics.csv (the one reader); multirun folders
    load          `resolve(path)` (what is there) and `load_pretrained(path, device, dtype)` (load it)

    from lrkv.io import load_pretrained
    model, tokenizer = load_pretrained("outputs/runs/NAME", device="cuda", dtype="bfloat16")
"""

from lrkv.io.checkpoints import find_checkpoint, read_metadata, resolve_last
from lrkv.io.hf_llama import is_hf_llama_folder, load_hf_llama, load_hf_tokenizer
from lrkv.io.load import Found, load_pretrained, parse_dtype, require_tokenizer, resolve
from lrkv.io.pretrained import Pretrained, find_pretrained_folder, load_tokenizer, read_model_config
from lrkv.io.runs import (
    expand_runs,
    find_run_dir,
    is_run_dir,
    logged_val_loss,
    metric_columns,
    read_metrics,
    read_run_config,
    read_summary,
)

__all__ = [
    "Found",
    "Pretrained",
    "expand_runs",
    "find_checkpoint",
    "find_pretrained_folder",
    "find_run_dir",
    "is_hf_llama_folder",
    "is_run_dir",
    "load_hf_llama",
    "load_hf_tokenizer",
    "load_pretrained",
    "load_tokenizer",
    "logged_val_loss",
    "metric_columns",
    "parse_dtype",
    "read_metadata",
    "read_metrics",
    "read_model_config",
    "read_run_config",
    "read_summary",
    "require_tokenizer",
    "resolve",
    "resolve_last",
]
