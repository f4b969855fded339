"""A study over seeds: runs grouped by model variant, mean ± std of final losses, steps to MHA's loss.

A variant is one model (preset name, attention kind and the fields that distinguish it: LRKV rank and
`residual_rope`); its runs differ by `seed` only. For each variant the study reports mean ± sample std over
seeds of the final validation loss and bits per byte, the difference to MHA's run of the same seed (seeds
share the data order, so paired differences are less noisy than the spread over seeds), the steps each seed
needed to reach the mean final validation loss of the MHA variant (the paper's "fewer steps to the baseline's
loss"), KV bytes per token, tokens/s and the head diversity of the final weights (effective rank of the
per-head W_Q,h W_K,hᵀ maps, % of H; docs/design-notes.md §5).

Sanity anchors (checks that the comparison is wired right, not results): LRKV at rank 0 keeps only the shared
K/V, MQA's cache, and should land near MQA; LRKV at the rank whose cache equals MHA's (1/H + r/d_h = 1) should
land near MHA. Each anchor reports the difference of mean final validation losses and the noise it is measured
against: sqrt(std_a² + std_b²), with a single-seed side taking the other side's seed std.

Outputs (in `out_dir`, names prefixed by `prefix`): `<prefix>.md` (the table and the anchors), `<prefix>.json`
(one record per run, the aggregates and the anchors), `<prefix>-loss.png` (validation loss vs steps: mean line
with a min–max band over seeds) and `<prefix>-pareto.png` (final validation loss vs KV bytes per token, error
bars = std). Command line:

    python -m lrkv.evaluation.study outputs/study_small --out docs/results --prefix 2026-12-02-study-small
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from lrkv.errors import ConfigError
from lrkv.evaluation.compare import load_run, steps_to_target
from lrkv.evaluation.report import markdown_table, write_json
from lrkv.io import expand_runs, read_run_config

KIND_ORDER = ("mha", "gqa", "mqa", "mla", "lrkv")


def variant_of(run: dict, config: dict) -> tuple[str, dict]:
    """(label, fields) of the model variant a run trained: kind plus what distinguishes it at equal shape."""
    model = config.get("model") or {}
    kind = model.get("attention") or run.get("attention") or "?"
    fields = {"kind": kind, "model": model.get("name") or run.get("model")}
    label = kind
    if kind == "lrkv":
        fields["rank"] = model.get("rank")
        decoupled = model.get("residual_rope") is False
        fields["residual_rope"] = not decoupled
        label = f"lrkv{'-decoupled' if decoupled else ''} r={model.get('rank')}"
    elif kind == "gqa":
        label = f"gqa G={model.get('kv_heads')}"
    elif kind == "mla":
        label = f"mla d_c={model.get('kv_latent')}"
    return label, fields


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def run_diversity(path: Path) -> float | None:
    """Mean head diversity (% of H over layers) of a run's exported model; None when it has none."""
    from lrkv.evaluation.diversity import diversity_summary, head_diversity
    from lrkv.io import load_pretrained

    folder = Path(path) / "pretrained"
    if not folder.is_dir():
        return None
    model = load_pretrained(folder).model
    return diversity_summary(head_diversity(model))["mean_percent"]


def study_runs(paths, baseline_kind: str = "mha", diversity: bool = True) -> dict:
    """Load the runs under `paths` (run folders or multirun folders) and aggregate them per variant."""
    runs = []
    for path in expand_runs(paths):
        run = load_run(path)
        config = read_run_config(path) or {}
        run["label"], run["variant"] = variant_of(run, config)
        run["seed"] = config.get("seed")
        run["head_diversity"] = run_diversity(path) if diversity else None
        runs.append(run)
    if not runs:
        raise ConfigError("the study found no runs: pass run or multirun folders")
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    base = [r for r in runs if r["variant"]["kind"] == baseline_kind]
    target, _ = mean_std([r["final_val_loss"] for r in base])
    base_by_seed = {r["seed"]: r["final_val_loss"] for r in base if r["final_val_loss"] is not None}
    rows = []
    for label, members in groups.items():
        for run in members:
            run["steps_to_target"] = steps_to_target(run["metrics"], target)[0] if target is not None else None
        loss, loss_std = mean_std([r["final_val_loss"] for r in members])
        bpb, bpb_std = mean_std([r["final_val_bpb"] for r in members])
        reached = [r["steps_to_target"] for r in members if r["steps_to_target"] is not None]
        paired = [
            r["final_val_loss"] - base_by_seed[r["seed"]]
            for r in members
            if r["seed"] in base_by_seed and r["final_val_loss"] is not None
        ]
        diff, diff_std = mean_std(paired)
        rows.append(
            {
                "variant": label,
                "seeds": len(members),
                "val_loss": loss,
                "val_loss_std": loss_std,
                "val_bpb": bpb,
                "val_bpb_std": bpb_std,
                "kv_bytes_per_token": members[0]["kv_bytes_per_token"],
                "params": members[0]["params"],
                "tokens": members[0]["tokens"],
                "steps": members[0]["steps"],
                "diff_vs_mha": diff,
                "diff_vs_mha_std": diff_std,
                "paired_seeds": len(paired),
                "steps_to_mha": statistics.fmean(reached) if reached else None,
                "reached_mha": len(reached),
                "tokens_per_s": mean_std([r["tokens_per_s"] for r in members])[0],
                "head_diversity": mean_std([r["head_diversity"] for r in members])[0],
                "kind": members[0]["variant"]["kind"],
                "rank": members[0]["variant"].get("rank"),
                "residual_rope": members[0]["variant"].get("residual_rope"),
            }
        )
    rows.sort(key=_row_order)
    records = [
        {
            "kind": r["variant"]["kind"],
            "variant": r["label"],
            "rank": r["variant"].get("rank"),
            "residual_rope": r["variant"].get("residual_rope"),
            "seed": r["seed"],
            "val_loss": r["final_val_loss"],
            "val_bpb": r["final_val_bpb"],
            "kv_bytes_per_token": r["kv_bytes_per_token"],
            "tokens": r["tokens"],
            "steps": r["steps"],
            "steps_to_mha": r["steps_to_target"],
            "tokens_per_s": r["tokens_per_s"],
            "head_diversity": r["head_diversity"],
            "run": Path(r["path"]).name,
        }
        for r in sorted(runs, key=lambda r: (_row_order(r["variant"]), r["seed"] if r["seed"] is not None else -1))
    ]
    return {
        "rows": rows,
        "runs": runs,
        "records": records,
        "target": target,
        "baseline_kind": baseline_kind,
        "anchors": anchors(rows),
    }


def _row_order(row: dict) -> tuple:
    kind = row["kind"]
    order = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    decoupled = row.get("residual_rope") is False or "decoupled" in str(row.get("variant", ""))
    return order, decoupled, row.get("rank") if row.get("rank") is not None else -1, str(row.get("variant", ""))


def anchors(rows: list[dict]) -> list[dict]:
    """The sanity anchors: LRKV r = 0 against MQA, LRKV at MHA's cache size against MHA (when both were run)."""
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    lrkv = [r for r in by_kind.get("lrkv", []) if "decoupled" not in r["variant"]]
    out = []
    for kind, pick, why in (
        ("mqa", lambda r: r["rank"] == 0, "rank 0 keeps only the shared K/V: MQA's cache"),
        ("mha", None, "1/H + r/d_h = 1: MHA's cache"),
    ):
        if not by_kind.get(kind):
            continue
        ref = by_kind[kind][0]
        if pick is None:
            pick = lambda r, ref=ref: r["kv_bytes_per_token"] == ref["kv_bytes_per_token"]  # noqa: E731
        for row in filter(pick, lrkv):
            if row["val_loss"] is None or ref["val_loss"] is None:
                continue
            stds = [s for s in (row["val_loss_std"], ref["val_loss_std"]) if s is not None]
            noise = math.sqrt(sum(s * s for s in stds) * (2 / len(stds))) if stds else None
            diff = row["val_loss"] - ref["val_loss"]
            out.append(
                {
                    "lrkv": row["variant"],
                    "reference": ref["variant"],
                    "why": why,
                    "val_loss_diff": diff,
                    "noise": noise,
                    "within_noise": None if noise is None else abs(diff) <= 2 * noise,
                }
            )
    return out


def _pm(mean, std, fmt=".4f") -> str:
    if mean is None:
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt}}" if std is not None else f"{mean:{fmt}}"


def _paired(row: dict) -> str:
    if row["kind"] == "mha" or row["diff_vs_mha"] is None:
        return "-"
    std = "" if row["diff_vs_mha_std"] is None else f" ± {row['diff_vs_mha_std']:.4f}"
    return f"{row['diff_vs_mha']:+.4f}{std} (n={row['paired_seeds']})"


def study_table(result: dict) -> str:
    header = (
        "variant",
        "seeds",
        "val loss (mean ± std)",
        "val bpb (mean ± std)",
        "Δ loss vs MHA, same seed",
        "KV B/token",
        "params",
        "steps to MHA's loss",
        "tok/s",
        "head diversity % of H",
    )
    lines = []
    for r in result["rows"]:
        steps = "-" if r["steps_to_mha"] is None else f"{r['steps_to_mha']:.0f} ({r['reached_mha']}/{r['seeds']})"
        lines.append(
            dict(
                zip(
                    header,
                    (
                        r["variant"],
                        str(r["seeds"]),
                        _pm(r["val_loss"], r["val_loss_std"]),
                        _pm(r["val_bpb"], r["val_bpb_std"]),
                        _paired(r),
                        f"{r['kv_bytes_per_token']:,}" if r["kv_bytes_per_token"] else "-",
                        f"{r['params']:,}" if r["params"] else "-",
                        steps,
                        f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                        f"{r['head_diversity']:.1f}" if r["head_diversity"] is not None else "-",
                    ),
                )
            )
        )
    return markdown_table(lines, header)


def plot_study(result: dict, out_dir: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {row["variant"]: [] for row in result["rows"]}  # the table's order
    for run in result["runs"]:
        groups.setdefault(run["label"], []).append(run)
    for label, members in groups.items():
        by_step: dict[int, list[float]] = {}
        for run in members:
            m = run["metrics"]
            for s, v in zip(m.get("step", []), m.get("val_loss", [])):
                if isinstance(s, (int, float)) and isinstance(v, (int, float)) and math.isfinite(v):
                    by_step.setdefault(int(s), []).append(v)
        steps = sorted(by_step)
        if not steps:
            continue
        mean = [statistics.fmean(by_step[s]) for s in steps]
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={len(members)})")
        ax.fill_between(
            steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.2, color=line.get_color()
        )
    if result["target"] is not None:
        ax.axhline(result["target"], color="gray", ls=":", lw=1, label="MHA final (mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}-loss.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in result["rows"]:
        if r["val_loss"] is None or not r["kv_bytes_per_token"]:
            continue
        ax.errorbar(r["kv_bytes_per_token"], r["val_loss"], yerr=r["val_loss_std"] or 0, fmt="o", capsize=3)
        ax.annotate(
            r["variant"],
            (r["kv_bytes_per_token"], r["val_loss"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    ax.set_ylabel("final validation loss (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}-pareto.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def anchors_text(result: dict) -> str:
    lines = []
    for a in result.get("anchors", []):
        noise = (
            "" if a["noise"] is None else f" (noise {a['noise']:.4f}: {'within' if a['within_noise'] else 'beyond'} 2σ)"
        )
        lines.append(f"- {a['lrkv']} vs {a['reference']} ({a['why']}): Δ val loss {a['val_loss_diff']:+.4f}{noise}")
    return "\n".join(lines)


def report_study(result: dict, out_dir: str | Path, prefix: str = "study") -> str:
    """Write `<prefix>.md/.json` and the plots; return the markdown text (table and anchors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = study_table(result)
    target = result["target"]
    note = f"MHA's mean final validation loss (the target for steps to MHA's loss): {target:.4f}\n\n" if target else ""
    anchor = anchors_text(result)
    text = note + table + ("\n\nSanity anchors:\n\n" + anchor if anchor else "")
    (out_dir / f"{prefix}.md").write_text(text + "\n")
    write_json(out_dir / f"{prefix}.json", {k: v for k, v in result.items() if k != "runs"})
    plot_study(result, out_dir, prefix)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Aggregate study runs over seeds (mean ± std, steps to MHA's loss).")
    parser.add_argument("runs", nargs="+", help="run folders or multirun folders")
    parser.add_argument("--out", required=True, help="folder for <prefix>.md/.json and the plots")
    parser.add_argument("--prefix", default="study")
    parser.add_argument("--baseline", default="mha", help="attention kind whose mean final loss is the target")
    parser.add_argument("--no-diversity", action="store_true", help="skip head diversity (loads every model)")
    args = parser.parse_args(argv)
    from lrkv.cli import run_cli

    result = run_cli(lambda: study_runs(args.runs, args.baseline, diversity=not args.no_diversity))
    print(report_study(result, args.out, args.prefix))


if __name__ == "__main__":
    main()
