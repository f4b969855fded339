"""`python evaluate.py mode=convert`: convert a checkpoint with lrkv/convert.py, write it, score both models.

The conversion itself (the fits, the math) is lrkv/convert.py; this module is the run around it: load the
source, write the converted pretrained folder, and measure the source's and the converted model's held-out
loss and KV bytes per token, as post-training compression does (lrkv/evaluation/compression.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lrkv.convert import DEFAULT_FIT, TARGETS, check_fit, check_rank, convert_model, load_source, save_folder
from lrkv.errors import ConfigError
from lrkv.evaluation.compression import kv_bytes, write_point
from lrkv.evaluation.loss import evaluate_checkpoint_loss


# ---- a run --------------------------------------------------------------------------------------------
def convert_run(
    ckpt,
    out,
    to: str = "lrkv",
    rank: int | None = None,
    overwrite: bool = False,
    fit: str = DEFAULT_FIT,
    *,
    device: str = "cpu",
    data: dict | None = None,
    loss: dict | None = None,
    score: bool = True,
    **fit_options,
) -> dict:
    """Convert checkpoint `ckpt` (run folder, pretrained folder, Lightning checkpoint, local HF Llama folder)
    to `to`=lrkv at `rank`, write the pretrained folder `out`, and measure both models' held-out loss.

    data: data-config overrides for the held-out loss (default: the source run's validation data, or the
    embedded corpus); loss: {split, seq_len, max_batches, max_tokens, batch_size}; score=False skips it.
    Returns {"source", "out", "to", "rank", "fit", "k_error", "v_error", "layers", "source_loss",
    "converted_loss", "kv_bytes_per_token": {...}, "text"} (`text`: the lines to print). Writes
    out/convert.json (the same dict) and out/summary.json (training-run format, for mode=compare).
    """
    if to not in TARGETS:
        raise ConfigError(f"to={to!r} is not supported; conversion targets: {', '.join(TARGETS)}")
    if rank is None:
        raise ConfigError("conversion needs rank=R (the per-head residual rank, 0 <= R <= head_dim)")
    check_fit(fit)
    if ckpt is None or str(ckpt) == "":
        raise ConfigError("conversion needs ckpt=RUN_DIR (a trained MHA or GQA run, pretrained folder or HF Llama)")
    if out is None or str(out) == "":
        raise ConfigError("conversion needs out=DIR (where the converted pretrained folder is written)")
    out = Path(str(out)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; pick a new folder or pass overwrite=true")
    source = load_source(ckpt, device)
    check_rank(rank, source.model.cfg.head_dim)
    model, report = convert_model(source.model, rank, fit, **fit_options)
    out.mkdir(parents=True, exist_ok=True)
    save_folder(model, out, source.tokenizer)
    converted = load_source(out, device)  # score what was written, not what is in memory

    source_loss = converted_loss = None
    data_cfg = None
    if score and source.tokenizer is not None:
        data_cfg = heldout_data(ckpt, data)
        source_loss = _score(source, data_cfg, loss)
        converted_loss = _score(converted, data_cfg, loss)
    result = {
        "source": str(source.path),
        "out": str(out),
        "to": to,
        **{k: report[k] for k in ("rank", "fit", "source_attention", "k_error", "v_error")},
        "source_loss": source_loss,
        "converted_loss": converted_loss,
        "kv_bytes_per_token": {"source": kv_bytes(source.model), "converted": kv_bytes(model)},
        "layers": report["layers"],
    }
    if converted_loss is not None:
        write_point(
            out,
            model.cfg.name,
            converted,
            {"loss": converted_loss["loss"], "bpb": converted_loss.get("bpb")},
            {"source": str(source.path), "method": f"convert-{fit}", "rank": rank},
        )
    result["text"] = report_text(result)
    from lrkv.data.utils import atomic_write

    atomic_write(str(out / "convert.json"), json.dumps(result, indent=2, default=str))
    return result


def heldout_data(ckpt, overrides: dict | None) -> dict | None:
    """The source run's data config (its validation split) with overrides; None: the embedded corpus."""
    from lrkv.io import find_run_dir
    from lrkv.io.runs import run_data_config

    return run_data_config(find_run_dir(ckpt), overrides)


def _score(pretrained, data_cfg, loss_opts) -> dict:
    opts = {k: v for k, v in (loss_opts or {}).items() if k in ("split", "seq_len", "max_batches", "max_tokens")}
    if (loss_opts or {}).get("batch_size"):
        opts["batch_size"] = loss_opts["batch_size"]
    result = evaluate_checkpoint_loss(pretrained, data_cfg, **opts)
    return {k: result[k] for k in ("loss", "ppl", "bpb", "tokens", "source", "split")}


def report_text(result: dict) -> str:
    kv = result["kv_bytes_per_token"]
    lines = [
        f"converted {result['source']} ({result['source_attention']}) -> lrkv rank {result['rank']} "
        f"(fit {result['fit']}) in {result['out']}",
        f"  relative projection error: K {result['k_error']:.4f}   V {result['v_error']:.4f}   "
        f"KV cache {kv['source']:,} -> {kv['converted']:,} B/token (bf16, ratio {kv['converted'] / kv['source']:.3f})",
    ]
    s, c = result["source_loss"], result["converted_loss"]
    if s is None or c is None:
        lines.append("  held-out loss: not measured (no tokenizer.json with the source, or score=False)")
    else:
        where = f"{s['source']} [{s['split']}], {s['tokens']:,} tokens"
        lines.append(f"  held-out loss on {where}: source {s['loss']:.4f}   converted {c['loss']:.4f}")
        if s.get("bpb") is not None and c.get("bpb") is not None:
            lines[-1] += f"   (bpb {s['bpb']:.4f} -> {c['bpb']:.4f})"
        if not math.isfinite(c["loss"]):
            lines.append("  warning: the converted model's loss is not finite")
    return "\n".join(lines)
