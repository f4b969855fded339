"""Evaluate checkpoints and compare runs: `python evaluate.py [mode=...] ckpt=RUN_DIR ...`.

Modes (configs/evaluate.yaml lists every option):
    loss       cross-entropy, perplexity, bits-per-byte on the run's validation split (default with ckpt)
    lm_eval    lm-evaluation-harness tasks through the registered "lrkv" model
    footprint  parameters and KV-cache bytes of presets, measured from meta-device caches
    compare    markdown table and plots over training runs; steps to reach a target loss
    diversity  head diversity: effective rank of per-head W_Q,h W_K,hᵀ per layer, % of H
    generate   completions through the KV cache, with tokens/s
    compress   post-training KV compression of a trained MHA/GQA model (compress=stief|eigen)

This file only turns the Hydra config into plain arguments and calls lrkv.evaluation. Errors of the
framework (`LrkvError`) print as one line, `error: ...`, with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from lrkv.cli import precheck, run_cli
from lrkv.errors import ConfigError


def merged(base: dict | None, override: dict | None) -> dict:
    """Recursive dict merge: override's leaves win."""
    out = dict(base or {})
    for key, value in (override or {}).items():
        out[key] = merged(out.get(key), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---- modes: plain dict config in, (result, printable text) out --------------------------------------------
def mode_loss(c: dict, out: Path):
    from lrkv.evaluation.loss import evaluate_checkpoint_loss
    from lrkv.evaluation.report import write_json
    from lrkv.evaluation.runs import find_run_dir, load_checkpoint, read_run_config, read_summary

    pretrained = load_checkpoint(c["ckpt"], c["device"], c["dtype"])
    run_dir = find_run_dir(c["ckpt"])
    run_cfg = read_run_config(run_dir) or {}
    data_cfg = merged(run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else None, c.get("data"))
    lc = c["loss"]
    result = evaluate_checkpoint_loss(
        pretrained,
        data_cfg,
        split=lc["split"],
        seq_len=lc["seq_len"],
        batch_size=c["batch_size"],
        max_batches=lc["max_batches"],
        max_tokens=lc["max_tokens"],
    )
    result = {
        "checkpoint": str(pretrained.path),
        "model": pretrained.model.cfg.name,
        "attention": pretrained.model.cfg.attention,
        **result,
    }
    same_data = (
        not c.get("data") and lc["split"] == "val" and not any(lc[k] for k in ("seq_len", "max_batches", "max_tokens"))
    )
    logged = read_summary(run_dir).get("final_val_loss") if run_dir and same_data else None
    if logged is not None:
        result["logged_final_val_loss"] = logged
    write_json(out / "loss.json", result)
    bpb = f"{result['bpb']:.4f}" if result["bpb"] is not None else "-"
    text = (
        f"{result['model']} ({result['attention']}) on {result['source']} [{result['split']}], "
        f"{result['tokens']:,} tokens / {result['bytes']:,} bytes, seq_len {result['seq_len']}:\n"
        f"  loss {result['loss']:.4f} nats/token   ppl {result['ppl']:.3f}   bpb {bpb}   "
        f"({result['tokens_per_s']:,.0f} tokens/s)"
    )
    if logged is not None:
        text += f"\n  training logged final val_loss {logged:.4f} (same data)"
    return result, text


def mode_lm_eval(c: dict, out: Path):
    from lrkv.evaluation.downstream import report_lm_eval, run_lm_eval
    from lrkv.evaluation.runs import load_checkpoint

    e = c["lm_eval"]
    pretrained = load_checkpoint(c["ckpt"], c["device"], c["dtype"])
    results = run_lm_eval(
        pretrained,
        e["tasks"] or e["default_tasks"],
        include_path=e["include_path"],
        include_defaults=e["include_defaults"],
        num_fewshot=e["num_fewshot"],
        limit=e["limit"],
        batch_size=c["batch_size"] or 8,
        device=c["device"],
        dtype=c["dtype"],
        max_length=e["max_length"],
        max_gen_toks=e["max_gen_toks"],
        bootstrap_iters=e["bootstrap_iters"],
        seed=c["seed"],
        log_samples=e["log_samples"],
        gen_kwargs=e["gen_kwargs"],
        prefix_eos=e["prefix_eos"],
    )
    return results, report_lm_eval(results, out)


def mode_footprint(c: dict, out: Path):
    from lrkv.evaluation.footprint import footprint_table, report_footprint

    rows = footprint_table(
        c["models"],
        context=c["context"],
        batch_size=c["batch_size"] or 1,
        dtype=c["cache_dtype"],
        memory_gib=c.get("memory_gib"),
        hbm_tb_s=c.get("hbm_tb_s", 3.35),
    )
    return rows, report_footprint(rows, out)


def mode_compare(c: dict, out: Path):
    from lrkv.evaluation.compare import compare_runs, report_compare

    cc = c["compare"]
    result = compare_runs(c["runs"], target=cc["target"], baseline=cc["baseline"], metric=cc["metric"])
    return result, report_compare(result, out)


def mode_diversity(c: dict, out: Path):
    from lrkv.evaluation.diversity import head_diversity, report_diversity
    from lrkv.evaluation.runs import expand_runs, find_run_dir, load_checkpoint, read_summary

    paths = expand_runs(c["runs"]) if c["runs"] else [c["ckpt"]]
    results = {}
    for path in paths:
        model = load_checkpoint(path, "cpu", "float32").model
        run_dir = find_run_dir(path) if path else None
        name = (read_summary(run_dir).get("name") if run_dir else None) or model.cfg.name
        while name in results:
            name += "'"
        results[name] = {"path": str(path), "attention": model.cfg.attention, "rows": head_diversity(model)}
    return results, report_diversity(results, out)


def mode_generate(c: dict, out: Path):
    from lrkv.evaluation.report import write_json
    from lrkv.evaluation.runs import load_checkpoint, parse_dtype
    from lrkv.evaluation.sample import generate_text, report_samples

    pretrained = load_checkpoint(c["ckpt"], c["device"], c["dtype"])
    prompts = [str(p) for p in c["prompts"]] if c["prompts"] else [str(c["prompt"] or "")]
    result = generate_text(
        pretrained,
        prompts,
        max_new_tokens=c["max_new_tokens"],
        temperature=c["temperature"],
        top_k=c["top_k"],
        top_p=c["top_p"],
        num_samples=c["num_samples"],
        seed=c["seed"],
        cache_dtype=parse_dtype(c["dtype"]),
    )
    write_json(out / "samples.json", result)
    return result, report_samples(result)


def mode_compress(c: dict, out: Path):
    """Compress ckpt with compress=stief|eigen (configs/compress/); compress.budgets=[...] makes one model per budget.
    Each compressed model is saved (a pretrained folder with summary.json) and scored on the source run's
    held-out data; with lm_eval.tasks also on lm-eval tasks."""
    from lrkv.evaluation.compression import compress_checkpoint, report_compression

    if not c.get("compress"):
        raise ConfigError("mode=compress needs a method: compress=stief or compress=eigen")
    if not c.get("ckpt"):
        raise ConfigError("mode=compress needs ckpt=RUN_DIR (a trained MHA or GQA model)")

    def score_tasks(pretrained, folder):
        from lrkv.evaluation.downstream import scores

        results, _ = mode_lm_eval({**c, "ckpt": str(folder)}, Path(folder))
        return scores(results)

    loss_opts = {**c["loss"], "batch_size": c["batch_size"]}
    result = compress_checkpoint(
        c["ckpt"],
        c["compress"],
        out,
        device=c["device"],
        loss_opts=loss_opts,
        data_cfg=c.get("data"),
        lm_eval=score_tasks if (c.get("lm_eval") or {}).get("tasks") else None,
    )
    return result, report_compression(result, out)


MODES = {
    "loss": mode_loss,
    "lm_eval": mode_lm_eval,
    "footprint": mode_footprint,
    "compare": mode_compare,
    "diversity": mode_diversity,
    "generate": mode_generate,
    "compress": mode_compress,
}


def resolvable(node: DictConfig, where: str) -> dict:
    """A data config node as a plain dict, leaf by leaf: interpolations into the training config
    (e.g. `seq_len: ${model.max_seq_len}` of configs/data/*.yaml) are dropped, so the run's own value
    is kept; a mandatory value left unset (`???`) is an error."""
    out = {}
    for key in node.keys():
        try:
            value = node[key]
        except MissingMandatoryValue:
            raise ConfigError(f"{where}.{key} must be set (e.g. {where}.{key}=...)") from None
        except InterpolationResolutionError:
            continue
        if isinstance(value, DictConfig):
            out[key] = resolvable(value, f"{where}.{key}")
        else:
            out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return out


def plain_config(cfg: DictConfig) -> dict:
    groups = ("data", "compress")  # config groups that may interpolate into keys only train.py has
    rest = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in groups])
    c = OmegaConf.to_container(rest, resolve=True)
    for group in groups:
        node = cfg.get(group)
        c[group] = resolvable(node, group) if isinstance(node, DictConfig) else None
    return c


def infer_mode(c: dict) -> str | None:
    """mode=null: a checkpoint with compress=... -> compress, with lm_eval.tasks -> lm_eval, with a prompt ->
    generate, alone -> loss; runs without a checkpoint -> compare."""
    if c.get("ckpt"):
        if c.get("compress"):
            return "compress"
        if (c.get("lm_eval") or {}).get("tasks"):
            return "lm_eval"
        if c.get("prompt") is not None or c.get("prompts"):
            return "generate"
        return "loss"
    return "compare" if c.get("runs") else None


def run(cfg: DictConfig | dict, out_dir: str | Path | None = None, echo: bool = True) -> dict:
    """Run one evaluation mode from a composed config; returns {"mode", "out_dir", "result", "text"}."""
    c = plain_config(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("hydra", None)
    mode = c.get("mode") or infer_mode(c)
    if mode is None:
        raise ConfigError("nothing to evaluate: pass ckpt=RUN_DIR (held-out loss) or mode=footprint|compare|...")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    out = Path(out_dir or c.get("out_dir") or "outputs/evaluate")
    out.mkdir(parents=True, exist_ok=True)
    result, text = MODES[mode](c, out)
    if echo:
        print(text)
        print(f"[{mode}] results in {out}")
    return {"mode": mode, "out_dir": out, "result": result, "text": text}


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: run(cfg, cfg.out_dir or HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    precheck(sys.argv[1:], "evaluate")
    main()
