"""The modes of `python evaluate.py mode=NAME`: one function per mode, a registry, and `run`.

    loss       cross-entropy, perplexity, bits-per-byte on the run's validation split
    lm_eval    lm-evaluation-harness tasks through the registered "lrkv" model
    footprint  parameters and KV-cache bytes of presets, measured from meta-device caches
    compare    markdown table and plots over training runs; steps to reach a target loss
    diversity  head diversity: effective rank of per-head W_Q,h W_K,hᵀ per layer, % of H
    generate   completions through the KV cache, with tokens/s
    compress   post-training KV compression of a trained MHA/GQA model (compress=stief|eigen)
    export     a Hugging Face transformers folder (lrkv.export.export_run)
    convert    a trained MHA/GQA model converted to another kind, e.g. LRKV (lrkv.evaluation.conversion.convert_run)

Every mode reads the common keys (ckpt, device, dtype, seed, out_dir, data) and its own section of
configs/evaluate.yaml (`loss.*`, `lm_eval.*`, `footprint.*`, `compare.*`, `diversity.*`,
`generate.*`, `export.*`, `convert.*`; compress reads the compress group `compress.*` and scores
with `loss.*` and `lm_eval.tasks`). A mode function takes the plain config dict and the output
folder and returns (result, printable text).

Short forms (`ALIASES`): the top-level keys models, context, batch_size, runs, prompt, prompts,
max_new_tokens, temperature, top_k, top_p, num_samples, chat, out, to, rank and overwrite set the
selected mode's own option (`batch_size=4` with mode=loss is `loss.batch_size=4`); one that the mode
does not have is an error. Without `mode=`, the commands of earlier versions still pick a mode:
compress=... -> compress; with ckpt: lm_eval.tasks -> lm_eval, a prompt -> generate, else loss;
runs without ckpt -> compare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lrkv.errors import ConfigError

MODES: dict[str, Callable] = {}

# top-level short form -> {mode: key in that mode's section}
ALIASES: dict[str, dict[str, str]] = {
    "models": {"footprint": "models"},
    "context": {"footprint": "context"},
    "memory_gib": {"footprint": "memory_gib"},
    "hbm_tb_s": {"footprint": "hbm_tb_s"},
    "batch_size": {"loss": "batch_size", "lm_eval": "batch_size", "footprint": "batch_size", "compress": "batch_size"},
    "runs": {"compare": "runs", "diversity": "runs"},
    **{k: {"generate": k} for k in ("prompt", "prompts", "max_new_tokens", "temperature", "top_k", "top_p")},
    "num_samples": {"generate": "num_samples"},
    "chat": {"generate": "chat"},
    "out": {"export": "out", "convert": "out"},
    "overwrite": {"export": "overwrite", "convert": "overwrite"},
    "to": {"convert": "to"},
    "rank": {"convert": "rank"},
}
SECTION = {"compress": "loss"}  # compress's short forms set its scoring options (loss.batch_size)


def mode(fn: Callable) -> Callable:
    """Register `fn` as the mode named after it (a trailing underscore is dropped)."""
    MODES[fn.__name__.rstrip("_")] = fn
    return fn


def need_ckpt(c: dict, name: str) -> str:
    if not c.get("ckpt"):
        raise ConfigError(f"mode={name} needs a checkpoint: pass ckpt=RUN_DIR (or a pretrained folder or checkpoint)")
    return c["ckpt"]


# ---- modes: plain dict config in, (result, printable text) out --------------------------------------------
@mode
def loss(c: dict, out: Path):
    """Loss, perplexity and bits-per-byte on the run's validation split, next to the loss training logged there."""
    from lrkv.evaluation.loss import evaluate_checkpoint_loss
    from lrkv.evaluation.report import write_json
    from lrkv.io import find_run_dir, load_pretrained, logged_val_loss, read_metrics, read_summary
    from lrkv.io.runs import run_data_config

    pretrained = load_pretrained(need_ckpt(c, "loss"), c["device"], c["dtype"])
    run_dir = find_run_dir(c["ckpt"])
    data_cfg = run_data_config(run_dir, c.get("data"))
    lc = c["loss"]
    result = evaluate_checkpoint_loss(
        pretrained,
        data_cfg,
        split=lc["split"],
        seq_len=lc["seq_len"],
        batch_size=lc["batch_size"],
        max_batches=lc["max_batches"],
        max_tokens=lc["max_tokens"],
    )
    result = {
        "checkpoint": str(pretrained.path),
        "step": pretrained.step,
        "model": pretrained.model.cfg.name,
        "attention": pretrained.model.cfg.attention,
        **result,
    }
    same_data = (
        not c.get("data") and lc["split"] == "val" and not any(lc[k] for k in ("seq_len", "max_batches", "max_tokens"))
    )
    # the reference is the validation loss logged at the step of these weights, never another step's
    logged = logged_val_loss(run_dir, pretrained.step) if same_data else None
    if logged is not None:
        result["logged_val_loss"], result["logged_step"] = logged["val_loss"], logged["step"]
        if pretrained.step == read_summary(run_dir).get("steps"):
            result["logged_final_val_loss"] = logged["val_loss"]
    write_json(out / "loss.json", result)
    bpb = f"{result['bpb']:.4f}" if result["bpb"] is not None else "-"
    text = (
        f"{result['model']} ({result['attention']}) on {result['source']} [{result['split']}], "
        f"{result['tokens']:,} tokens / {result['bytes']:,} bytes, seq_len {result['seq_len']}:\n"
        f"  loss {result['loss']:.4f} nats/token   ppl {result['ppl']:.3f}   bpb {bpb}   "
        f"({result['tokens_per_s']:,.0f} tokens/s)"
    )
    for name in result.get("sources") or []:  # a mixture run: each source as training validated it
        text += (
            f"\n  {name}: loss {result[f'val_loss/{name}']:.4f}   bpb {result[f'val_bpb/{name}'] or float('nan'):.4f}"
        )
    if logged is not None:
        text += f"\n  training logged val_loss {logged['val_loss']:.4f} at step {logged['step']} (same data)"
    elif same_data and run_dir is not None and any("val_loss" in row for row in read_metrics(run_dir)):
        at = f"step {pretrained.step}" if pretrained.step is not None else "the step of these weights"
        text += f"\n  (training logged no validation loss at {at}; nothing to compare with)"
    return result, text


@mode
def lm_eval(c: dict, out: Path):
    """lm-evaluation-harness tasks (lm_eval.tasks, else lm_eval.default_tasks) through the "lrkv" model."""
    from lrkv.evaluation.downstream import report_lm_eval, run_lm_eval
    from lrkv.io import load_pretrained

    e = c["lm_eval"]
    pretrained = load_pretrained(need_ckpt(c, "lm_eval"), c["device"], c["dtype"])
    results = run_lm_eval(
        pretrained,
        e["tasks"] or e["default_tasks"],
        include_path=e["include_path"],
        include_defaults=e["include_defaults"],
        num_fewshot=e["num_fewshot"],
        limit=e["limit"],
        batch_size=e["batch_size"],
        max_batch_size=e.get("max_batch_size"),
        device=c["device"],
        dtype=c["dtype"],
        max_length=e["max_length"],
        max_gen_toks=e["max_gen_toks"],
        bootstrap_iters=e["bootstrap_iters"],
        seed=c["seed"],
        log_samples=e["log_samples"],
        gen_kwargs=e["gen_kwargs"],
        prefix_eos=e["prefix_eos"],
        confirm_run_unsafe_code=bool(e.get("confirm_run_unsafe_code", False)),
    )
    return results, report_lm_eval(results, out)


@mode
def footprint(c: dict, out: Path):
    """Parameters and KV-cache bytes of presets or pretrained folders (footprint.models)."""
    from lrkv.evaluation.footprint import footprint_table, report_footprint

    f = c["footprint"]
    rows = footprint_table(
        f["models"],
        context=f["context"],
        batch_size=f["batch_size"],
        dtype=f["cache_dtype"],
        memory_gib=f.get("memory_gib"),
        hbm_tb_s=f.get("hbm_tb_s") or 3.35,
    )
    return rows, report_footprint(rows, out)


@mode
def compare(c: dict, out: Path):
    """Table and plots over training runs (compare.runs); steps to a target loss."""
    from lrkv.evaluation.compare import compare_runs, report_compare

    cc = c["compare"]
    result = compare_runs(cc["runs"], target=cc["target"], baseline=cc["baseline"], metric=cc["metric"])
    return result, report_compare(result, out)


@mode
def diversity(c: dict, out: Path):
    """Head diversity of ckpt, or of several runs on one plot (diversity.runs)."""
    from lrkv.evaluation.diversity import head_diversity, report_diversity
    from lrkv.io import expand_runs, find_run_dir, load_pretrained, read_summary

    runs = c["diversity"]["runs"]
    paths = expand_runs(runs) if runs else [need_ckpt(c, "diversity")]
    results = {}
    for path in paths:
        model = load_pretrained(path, "cpu", "float32").model
        run_dir = find_run_dir(path)
        name = (read_summary(run_dir).get("name") if run_dir else None) or model.cfg.name
        while name in results:
            name += "'"
        results[name] = {"path": str(path), "attention": model.cfg.attention, "rows": head_diversity(model)}
    return results, report_diversity(results, out)


@mode
def generate(c: dict, out: Path):
    """Completions of generate.prompt / generate.prompts (none: unconditional) through the KV cache."""
    from lrkv.evaluation.report import write_json
    from lrkv.evaluation.sample import generate_text, report_samples
    from lrkv.io import load_pretrained, parse_dtype

    g = c["generate"]
    pretrained = load_pretrained(need_ckpt(c, "generate"), c["device"], c["dtype"])
    prompts = [str(p) for p in g["prompts"]] if g["prompts"] else [str(g["prompt"] or "")]
    result = generate_text(
        pretrained,
        prompts,
        max_new_tokens=g["max_new_tokens"],
        temperature=g["temperature"],
        top_k=g["top_k"],
        top_p=g["top_p"],
        num_samples=g["num_samples"],
        seed=c["seed"],
        cache_dtype=parse_dtype(c["dtype"]),
        chat=bool(g.get("chat", False)),
    )
    write_json(out / "samples.json", result)
    return result, report_samples(result)


@mode
def compress(c: dict, out: Path):
    """Compress ckpt with compress=stief|eigen (configs/compress/); compress.budgets=[...] makes one model per budget.
    Each compressed model is saved (a pretrained folder with summary.json) and scored on the source run's
    held-out data with the loss.* options; with lm_eval.tasks also on lm-eval tasks."""
    from lrkv.evaluation.compression import compress_checkpoint, report_compression

    if not c.get("compress"):
        raise ConfigError("mode=compress needs a method: compress=stief or compress=eigen")
    if not c.get("ckpt"):
        raise ConfigError("mode=compress needs ckpt=RUN_DIR (a trained MHA or GQA model)")

    def score_tasks(pretrained, folder):
        from lrkv.evaluation.downstream import scores

        results, _ = lm_eval({**c, "ckpt": str(folder)}, Path(folder))
        return scores(results)

    result = compress_checkpoint(
        c["ckpt"],
        c["compress"],
        out,
        device=c["device"],
        loss_opts=c["loss"],
        data_cfg=c.get("data"),
        lm_eval=score_tasks if c["lm_eval"].get("tasks") else None,
    )
    return result, report_compression(result, out)


def _printable(result, fallback: str) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, dict) and isinstance(result.get("text"), str):
        return result["text"]
    return fallback


@mode
def export(c: dict, out: Path):
    """A Hugging Face transformers folder of ckpt at export.out (lrkv.export.export_run)."""
    e = c["export"]
    ckpt = need_ckpt(c, "export")
    if not e.get("out"):
        raise ConfigError("mode=export needs an output folder: pass out=DIR (export.out=DIR)")
    from lrkv.export import export_run

    result = export_run(ckpt, e["out"], overwrite=bool(e["overwrite"]))
    return result, _printable(result, f"exported {c['ckpt']} to {e['out']}")


@mode
def convert(c: dict, out: Path):
    """ckpt converted to another attention kind (convert.to, e.g. lrkv with convert.rank) at convert.out."""
    v = c["convert"]
    ckpt = need_ckpt(c, "convert")
    if not v.get("out"):
        raise ConfigError("mode=convert needs an output folder: pass out=DIR (convert.out=DIR)")
    if not v.get("to"):
        raise ConfigError("mode=convert needs a target kind: pass to=lrkv (convert.to=...)")
    from lrkv.evaluation.conversion import convert_run

    loss = {k: x for k, x in (c.get("loss") or {}).items() if x is not None}  # scoring options (loss.*)
    result = convert_run(ckpt, v["out"], to=v["to"], rank=v["rank"], overwrite=bool(v["overwrite"]), loss=loss)
    return result, _printable(result, f"converted {c['ckpt']} to {v['to']} in {v['out']}")


# ---- config -> mode ---------------------------------------------------------------------------------
def infer_mode(c: dict) -> str | None:
    """The mode of a command without `mode=` (the forms of earlier versions; see the module docstring)."""
    if c.get("compress"):
        return "compress"
    if c.get("ckpt"):
        if (c.get("lm_eval") or {}).get("tasks"):
            return "lm_eval"
        g = c.get("generate") or {}
        if c.get("prompt") is not None or c.get("prompts") or g.get("prompt") is not None or g.get("prompts"):
            return "generate"
        return "loss"
    return "compare" if c.get("runs") or (c.get("compare") or {}).get("runs") else None


def select_mode(c: dict) -> str:
    """The mode name; a one-line error listing the modes when it is missing or unknown."""
    name = c.get("mode") or infer_mode(c)
    if name is None:
        raise ConfigError(f"nothing to evaluate: choose a mode with mode=NAME, one of {', '.join(MODES)}")
    if name not in MODES:
        raise ConfigError(f"unknown mode {name!r}; use mode=NAME with NAME one of {', '.join(MODES)}")
    return name


def apply_aliases(c: dict, name: str) -> dict:
    """Move the top-level short forms that are set into the selected mode's section."""
    c = dict(c)
    for alias, targets in ALIASES.items():
        value = c.pop(alias, None)
        if value is None:
            continue
        if name not in targets:
            uses = ", ".join(f"mode={m}" for m in targets)
            raise ConfigError(f"{alias}= does not apply to mode={name} (it is an option of {uses})")
        section = SECTION.get(name, name)
        c[section] = {**(c.get(section) or {}), targets[name]: value}
    return c


def plain_config(cfg) -> dict:
    """A composed Hydra config (DictConfig) as plain dicts. The data and compress groups are read leaf by leaf:
    their interpolations into keys only train.py has (e.g. `seq_len: ${model.max_seq_len}`) are dropped, so
    the run's own value is kept; a mandatory value left unset (`???`) is an error."""
    from omegaconf import DictConfig, OmegaConf

    groups = ("data", "compress")
    rest = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in groups])
    c = OmegaConf.to_container(rest, resolve=True)
    for group in groups:
        node = cfg.get(group)
        c[group] = _resolvable(node, group) if isinstance(node, DictConfig) else None
    return c


def _resolvable(node, where: str) -> dict:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    out = {}
    for key in node.keys():
        try:
            value = node[key]
        except MissingMandatoryValue:
            raise ConfigError(f"{where}.{key} must be set (e.g. {where}.{key}=...)") from None
        except InterpolationResolutionError:
            continue
        if isinstance(value, DictConfig):
            out[key] = _resolvable(value, f"{where}.{key}")
        else:
            out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return out


def prepare(cfg) -> tuple[str, dict]:
    """(mode name, plain config with the short forms moved into the mode's section), without running anything."""
    c = plain_config(cfg) if not isinstance(cfg, dict) else dict(cfg)
    c.pop("hydra", None)
    name = select_mode(c)
    return name, apply_aliases(c, name)


def run(cfg, out_dir: str | Path | None = None, echo: bool = True) -> dict:
    """Run one evaluation mode from a composed config; returns {"mode", "out_dir", "result", "text"}."""
    name, c = prepare(cfg)
    out = Path(out_dir or c.get("out_dir") or "outputs/evaluate")
    out.mkdir(parents=True, exist_ok=True)
    result, text = MODES[name](c, out)
    if echo:
        print(text)
        print(f"[{name}] results in {out}")
    return {"mode": name, "out_dir": out, "result": result, "text": text}
