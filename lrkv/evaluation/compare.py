"""Compare training runs: a markdown table and plots from the runs' metrics.csv and summary.json.

Outputs (in `out_dir`):
    compare.md / compare.csv / compare.json   one row per run: attention, params, KV bytes/token,
                                              steps, tokens, final losses, steps to the target loss
    loss_vs_steps.png, loss_vs_tokens.png     validation loss (markers) and training loss (thin) of all runs
    pareto_kv.png                             final validation loss vs KV-cache bytes per token (log x),
                                              points annotated with run names, the Pareto front drawn

Steps to target (the paper's "fewer steps to reach the baseline's loss"): the first logged step at
which a run's loss (validation by default) is <= the target. The default target is the final
validation loss of the baseline run: `baseline=NAME`, else the first MHA run, else the first run.
`vs baseline` is that step count divided by the baseline's own.

Runs that logged no validation loss (no validation data, or `train.val_every=0`) are compared on
what they have: their validation columns stay empty, they are left out of pareto_kv.png (which is not
written when no run has a validation loss), and without a target the steps-to-target columns stay
empty; each omission is stated in a note above the table (`result["notes"]`).
"""

from __future__ import annotations

import math
from pathlib import Path

from lrkv.errors import ConfigError
from lrkv.evaluation.report import markdown_table, text_table, write_csv, write_json
from lrkv.io.runs import expand_runs, metric_columns, read_metrics, read_run_config, read_summary

COLUMNS = (
    "name",
    "attention",
    "params",
    "kv_bytes_per_token",
    "steps",
    "tokens",
    "final_train_loss",
    "final_val_loss",
    "final_val_bpb",
    "tokens_per_s",
    "steps_to_target",
    "tokens_to_target",
    "vs_baseline",
)
FORMATS = {
    "final_train_loss": ".4f",
    "final_val_loss": ".4f",
    "final_val_bpb": ".4f",
    "tokens_per_s": ",.0f",
    "params": ",",
    "kv_bytes_per_token": ",",
    "tokens": ",",
    "tokens_to_target": ",",
    "vs_baseline": ".2f",
}
HEADERS = {
    "kv_bytes_per_token": "KV B/token",
    "final_train_loss": "train loss",
    "final_val_loss": "val loss",
    "final_val_bpb": "val bpb",
    "tokens_per_s": "tok/s",
    "steps_to_target": "steps to target",
    "tokens_to_target": "tokens to target",
    "vs_baseline": "vs baseline",
}
METRICS = ("val_loss", "train_loss")


def _last(values):
    for v in reversed(values or []):
        if isinstance(v, (int, float)) and math.isfinite(v):
            return v
    return None


def _series(metrics: dict, x: str, y: str) -> tuple[list, list]:
    xs, ys = [], []
    for a, b in zip(metrics.get(x, []), metrics.get(y, [])):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(b):
            xs.append(a)
            ys.append(b)
    return xs, ys


def load_run(path: Path) -> dict:
    """Everything compare needs from one run folder, with fallbacks when summary.json lacks a field."""
    summary = read_summary(path)
    metrics = metric_columns(read_metrics(path))
    config = read_run_config(path) or {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else None
    name = summary.get("name") or (model_cfg or {}).get("name")
    run = {
        "path": str(path),
        "name": name or path.name,
        "model": summary.get("model") or (model_cfg or {}).get("name"),
        "attention": summary.get("attention") or (model_cfg or {}).get("attention"),
        "params": summary.get("params"),
        "kv_bytes_per_token": summary.get("kv_bytes_per_token"),
        "steps": summary.get("steps") or _last(metrics.get("step")),
        "tokens": summary.get("tokens") or _last(metrics.get("tokens")),
        "final_train_loss": summary.get("final_train_loss", _last(metrics.get("train_loss"))),
        "final_val_loss": summary.get("final_val_loss", _last(metrics.get("val_loss"))),
        "final_val_bpb": summary.get("final_val_bpb", _last(metrics.get("val_bpb"))),
        "tokens_per_s": summary.get("tokens_per_s"),
        "method": summary.get("method"),
        "source": summary.get("source"),  # post-training compressed models
        "kv_ratio": summary.get("kv_ratio"),
        "metrics": metrics,
    }
    if (run["params"] is None or run["kv_bytes_per_token"] is None) and model_cfg:
        try:
            from lrkv.config import ModelConfig
            from lrkv.model import param_counts

            cfg = ModelConfig.from_dict(model_cfg)
            run["params"] = run["params"] or param_counts(cfg)["total"]
            run["kv_bytes_per_token"] = run["kv_bytes_per_token"] or cfg.kv_cache_bytes_per_token()
        except Exception:  # noqa: BLE001 - a config this version cannot build: leave the fields empty
            pass
    return run


def steps_to_target(metrics: dict, target: float, metric: str = "val_loss") -> tuple[int | None, int | None]:
    """(step, tokens) of the first logged row whose `metric` is <= target; (None, None) if never."""
    steps, tokens, values = metrics.get("step", []), metrics.get("tokens", []), metrics.get(metric, [])
    rows = sorted(
        (s, t, v)
        for s, t, v in zip(steps, tokens + [None] * len(steps), values)
        if isinstance(s, (int, float)) and isinstance(v, (int, float))
    )
    for step, tok, value in rows:
        if value <= target:
            return int(step), (int(tok) if isinstance(tok, (int, float)) else None)
    return None, None


def pick_baseline(runs: list[dict], baseline: str | None) -> dict:
    if baseline:
        for run in runs:
            if baseline in (run["name"], Path(run["path"]).name, run["path"], run["model"]):
                return run
        raise ConfigError(f"baseline={baseline!r} matches no run; runs: {', '.join(r['name'] for r in runs)}")
    return next((r for r in runs if r["attention"] == "mha"), runs[0])


def compare_runs(paths, target: float | None = None, baseline: str | None = None, metric: str = "val_loss") -> dict:
    """Load runs, pick the baseline and target, and compute steps-to-target. Returns {"runs", "target", ...}."""
    if metric not in METRICS:
        raise ConfigError(f"compare metric {metric!r} is unknown; use {' or '.join(METRICS)}")
    runs = [load_run(p) for p in expand_runs(paths)]
    seen: dict[str, int] = {}
    for run in runs:  # unique names (multirun folders often share a preset name)
        seen[run["name"]] = seen.get(run["name"], 0) + 1
    for run in runs:
        if seen[run["name"]] > 1:
            run["name"] = f"{run['name']} ({Path(run['path']).name})"
    base = pick_baseline(runs, baseline)
    notes = []
    if target is None:
        target = base["final_val_loss"] if metric == "val_loss" else _last(base["metrics"].get("train_loss"))
        source = f"final {metric.replace('_', ' ')} of the baseline {base['name']}"
        if target is None:
            source = None
            notes.append(
                f"the baseline {base['name']} logged no {metric}: steps to target left out "
                "(pass compare.target=<loss> to set one)"
            )
    else:
        source = "given"
    missing = [r["name"] for r in runs if r["final_val_loss"] is None]
    if missing:
        notes.append(
            f"no validation loss logged by {', '.join(missing)}: val loss/bpb left empty and "
            "left out of the loss-vs-KV-bytes plot (train with train.val_every > 0 and validation data)"
        )
    for run in runs:
        run["steps_to_target"], run["tokens_to_target"] = (
            steps_to_target(run["metrics"], target, metric) if target is not None else (None, None)
        )
    base_steps = base["steps_to_target"]
    for run in runs:
        s = run["steps_to_target"]
        run["vs_baseline"] = s / base_steps if s is not None and base_steps else None
    return {
        "runs": runs,
        "target": float(target) if target is not None else None,
        "target_source": source,
        "metric": metric,
        "baseline": base["name"],
        "notes": notes,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, loss) not dominated by a point with lower-or-equal cost and lower loss."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_compare(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, target = result["runs"], result["target"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    files = []
    for x, label, fname in (("step", "step", "loss_vs_steps.png"), ("tokens", "tokens", "loss_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(runs):
            c = colors[i % len(colors)]
            xs, ys = _series(run["metrics"], x, "train_loss")
            if xs:
                ax.plot(xs, ys, color=c, alpha=0.35, lw=1)
            xs, ys = _series(run["metrics"], x, "val_loss")
            if xs:
                ax.plot(xs, ys, color=c, marker="o", ms=3, lw=1.5, label=f"{run['name']} (val)")
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.4f}")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token); thin: train")
        ax.set_title(f"loss vs {label}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing labelled when no run logged validation and there is no target
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        files.append(out_dir / fname)

    pts = [
        (r["kv_bytes_per_token"], r["final_val_loss"], r["name"], i)
        for i, r in enumerate(runs)
        if r["kv_bytes_per_token"] and r["final_val_loss"] is not None
    ]
    if not pts:  # no run with a validation loss: nothing to put on the loss-vs-KV-bytes plot (a note says so)
        return files
    fig, ax = plt.subplots(figsize=(7.5, 5))
    trained = [p for p in pts if not runs[p[3]].get("method")]
    for n, (cost, loss, name, _) in enumerate(trained):
        ax.scatter([cost], [loss], color=colors[n % len(colors)], s=45, zorder=3)
        ax.annotate(name, (cost, loss), textcoords="offset points", xytext=(5, 5), fontsize=8)
    groups: dict[tuple, list] = {}  # compressed models: one line per (source, method), points labelled by KV ratio
    for p in pts:
        run = runs[p[3]]
        if run.get("method"):
            groups.setdefault((run.get("source"), run["method"]), []).append(p)
    for (source, method), group in groups.items():
        group.sort()
        ax.plot(
            [g[0] for g in group],
            [g[1] for g in group],
            marker="s",
            ms=4,
            lw=1.2,
            ls="--",
            label=f"{source} + {method} (post-training)",
        )
        for cost, loss, _, i in group:
            ratio = runs[i].get("kv_ratio")
            if ratio:
                ax.annotate(f"{ratio:.2f}", (cost, loss), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if pts:
        front = pareto_front([(p[0], p[1]) for p in pts])
        ax.plot(
            [pts[i][0] for i in front], [pts[i][1] for i in front], color="gray", ls=":", lw=1, label="Pareto front"
        )
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("KV-cache bytes per token (bf16, all layers)")
    ax.set_ylabel("final validation loss")
    ax.set_title("loss vs KV cache")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_dir / "pareto_kv.png", dpi=120)
    plt.close(fig)
    files.append(out_dir / "pareto_kv.png")
    return files


def report_compare(result: dict, out_dir: str | Path | None = None) -> str:
    rows = result["runs"]
    if result["target"] is not None:
        header = (
            f"target {result['metric']} = {result['target']:.4f} ({result['target_source']}); "
            f"steps to target = first logged step with {result['metric']} <= target; baseline: {result['baseline']}"
        )
    else:
        header = f"no target {result['metric']}; baseline: {result['baseline']}"
    notes = [f"note: {n}" for n in result.get("notes", [])]
    text = "\n".join([header, *notes, text_table(rows, COLUMNS, FORMATS, HEADERS)])
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = plot_compare(result, out_dir)
        md = "# Run comparison\n\n" + header + "\n\n" + "".join(f"- {n}\n" for n in notes)
        md += ("\n" if notes else "") + markdown_table(rows, COLUMNS, FORMATS, HEADERS) + "\n\n"
        md += "".join(f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots)
        (out_dir / "compare.md").write_text(md)
        write_csv(out_dir / "compare.csv", rows, COLUMNS + ("path",))
        write_json(
            out_dir / "compare.json",
            {
                **{k: v for k, v in result.items() if k != "runs"},
                "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in rows],
            },
        )
    return text
