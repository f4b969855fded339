"""Compress trained full-attention checkpoints and score them like trained runs.

    rows = compress_checkpoint(ckpt, options, out)          # evaluate.py ckpt=... compress=stief
    result = compression_study(run_dirs, out, ...)          # train.py experiment=compress_study (at the end)

Each compressed model is saved as a pretrained folder with a `summary.json` in the training-run
format (name, attention, params, kv_bytes_per_token, final_val_loss, final_val_bpb), so that
`mode=compare` puts compressed models on the same loss-vs-KV-bytes plot as trained ones.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lrkv.errors import ConfigError
from lrkv.evaluation.loss import evaluate_checkpoint_loss
from lrkv.evaluation.report import markdown_table, text_table, write_json
from lrkv.io import Pretrained, find_run_dir, load_pretrained, read_summary
from lrkv.io.runs import run_data_config
from lrkv.measure import kv_cache_bytes


def kv_bytes(model, dtype=torch.bfloat16) -> int:
    """Measured from a real cache after a prefill on the meta device (equals the analytic formula)."""
    return kv_cache_bytes(model.cfg, dtype).per_token


def score(pretrained: Pretrained, data_cfg: dict | None, loss_opts: dict | None = None) -> dict:
    loss_opts = {
        k: v
        for k, v in (loss_opts or {}).items()
        if k in ("split", "seq_len", "max_batches", "max_tokens", "batch_size")
    }
    return evaluate_checkpoint_loss(pretrained, data_cfg, **loss_opts)


def write_point(folder: Path, name: str, pretrained: Pretrained, loss: dict, extra: dict) -> dict:
    """summary.json of a compressed model, in the training-run format that compare reads."""
    model = pretrained.model
    summary = {
        "name": name,
        "model": model.cfg.name,
        "attention": model.cfg.attention,
        "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "kv_bytes_per_token": kv_bytes(model),
        "final_val_loss": loss["loss"],
        "final_val_bpb": loss.get("bpb"),
        **extra,
    }
    write_json(folder / "summary.json", summary)
    return summary


def split_options(options: dict) -> tuple[dict, list | None]:
    options = copy.deepcopy(dict(options or {}))
    budgets = options.pop("budgets", None)
    if budgets is not None and not isinstance(budgets, (list, tuple)):
        raise ConfigError(f"compress.budgets must be a list such as [0.5,0.7,0.9], got {budgets!r}")
    return options, budgets


def compress_checkpoint(
    ckpt,
    options: dict,
    out: Path,
    *,
    device: str = "cpu",
    loss_opts: dict | None = None,
    data_cfg: dict | None = None,
    lm_eval=None,
) -> dict:
    """Compress one checkpoint with options (configs/compress/*.yaml; `budgets: [...]` compresses at several),
    save each compressed model under `out`, and report held-out loss / bpb next to the source model."""
    from lrkv.compress import compress_sweep, fit_compression, save_compressed

    source = load_pretrained(ckpt, device, "float32")
    run_dir = find_run_dir(ckpt)
    data_cfg = run_data_config(run_dir, data_cfg)  # the source run's held-out data, unless overridden
    options, budgets = split_options(options)
    source_name = (read_summary(run_dir).get("name") if run_dir else None) or source.model.cfg.name
    base = score(source, data_cfg, loss_opts)
    rows = [
        {
            "name": source_name,
            "method": "none",
            "budget": 1.0,
            "kv_ratio": 1.0,
            "kv_bytes_per_token": kv_bytes(source.model),
            "val_loss": base["loss"],
            "val_bpb": base.get("bpb"),
            "folder": str(source.path),
        }
    ]
    out = Path(out)
    if budgets:
        made = compress_sweep(
            source.model,
            None,
            methods=(options.pop("method", "stief"),),
            budgets=budgets,
            out_dir=out,
            tokenizer=source.tokenizer,
            **options,
        )
        folders = [Path(m["folder"]) for m in made]
    else:
        model, report = fit_compression(source.model, None, tokenizer=source.tokenizer, **options).compress()
        folder = save_compressed(model, out / "compressed", report, source.tokenizer)
        folders = [folder]
    for folder in folders:
        compressed = load_pretrained(folder, device, "float32")
        attn = compressed.model.cfg.attn_options
        name = f"{source_name}-{attn.get('method')}-{attn.get('kv_ratio', 0):.2f}"
        loss = score(compressed, data_cfg, loss_opts)
        extra = {
            "source": source_name,
            "method": attn.get("method"),
            "budget": attn.get("budget"),
            "kv_ratio": attn.get("kv_ratio"),
        }
        summary = write_point(folder, name, compressed, loss, extra)
        row = {
            "name": name,
            "method": extra["method"],
            "budget": extra["budget"],
            "kv_ratio": extra["kv_ratio"],
            "kv_bytes_per_token": summary["kv_bytes_per_token"],
            "val_loss": loss["loss"],
            "val_bpb": loss.get("bpb"),
            "folder": str(folder),
        }
        if lm_eval is not None:
            row["lm_eval"] = lm_eval(compressed, folder)
        rows.append(row)
    result = {"source": str(source.path), "rows": rows}
    write_json(out / "compression.json", result)
    return result


COLUMNS = ["name", "method", "budget", "kv_ratio", "kv_bytes_per_token", "val_loss", "val_bpb"]
FORMATS = {"budget": ".2f", "kv_ratio": ".3f", "val_loss": ".4f", "val_bpb": ".4f"}


def report_compression(result: dict, out: Path) -> str:
    rows = result["rows"]
    (Path(out) / "compression.md").write_text(markdown_table(rows, COLUMNS, FORMATS) + "\n")
    return f"KV compression of {result['source']} (held-out loss)\n" + text_table(rows, COLUMNS, FORMATS)


def compression_study(
    run_dirs: list,
    out: Path,
    *,
    methods=("eigen", "stief"),
    budgets=(0.5, 0.6, 0.7, 0.8, 0.9),
    options: dict | None = None,
    source_attention: str = "mha",
) -> dict:
    """Compress the first `source_attention` run at every budget with every method, then one compare
    table and plot of trained and compressed models (validation loss vs KV bytes per token)."""
    from lrkv.evaluation.compare import compare_runs, report_compare
    from lrkv.io import expand_runs

    runs = expand_runs(run_dirs)
    source = next((r for r in runs if read_summary(r).get("attention") == source_attention), None)
    if source is None:
        raise ConfigError(
            f"no {source_attention} run among {', '.join(map(str, runs))}; the study compresses a full-attention run"
        )
    out = Path(out)
    compressed = []
    for method in methods:
        opts = {**(options or {}), "method": method, "budgets": list(budgets)}
        result = compress_checkpoint(source, opts, out / method)
        compressed += [Path(r["folder"]) for r in result["rows"] if r["method"] != "none"]
    comparison = compare_runs([*runs, *compressed])
    text = report_compare(comparison, out)
    return {"comparison": comparison, "text": text, "compressed": [str(p) for p in compressed]}
