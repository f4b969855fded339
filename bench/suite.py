"""Every benchmark in one command, for a fresh GPU machine (no network): `python -m bench.suite`.

    python -m bench.suite            # GPU: about 9 minutes at most (--budget-s), results in bench/results/
    python -m bench.suite --quick    # the same pipeline at tiny sizes on a CPU, in under 3 minutes

Phases, in order (a phase that fails is recorded with its error and the next one runs; a phase that
would start after --budget-s seconds is recorded as skipped):

1. train: a real `python train.py` (subprocess) of a reduced-depth 1b preset (lrkv_1b, 4 layers,
   8 x 2048 tokens per step, bf16-mixed, train.compile=true, SDPA or flash-attn when installed) for 30
   steps on the embedded corpus: first and last training loss, tokens/s, MFU and peak memory from its
   metrics.csv, and the MFU recomputed with lrkv.training.monitor.mfu from the logged tokens/s.
   (--quick: a 2-layer x 64 lrkv_tiny on the stdlib's help topics, fp32, no compile, and a nominal
   1 TFLOP/s "peak" so that the MFU arithmetic runs on a CPU.)
2. train_step: bench/train_step.py for every kind, with --compile, at the 1b width (8 layers, 8 x 2048)
   and at the 128m width (12 layers, 16 x 1024): tokens/s, ratio to MHA, MFU, framework_vs_bare.
3. decode: bench/decode.py at the 1b width (4 layers, contexts 2048 and 8192); then its
   --attention-only mode when that version of bench/decode.py has it.

Writes bench/results/suite.jsonl (one record: device, torch, git commit, date, command, every phase),
appends each benchmark's record to bench/results/<name>.jsonl, and appends a dated section with the
tables to bench/RESULTS.md. --quick writes to outputs/bench-quick/ instead (git ignores outputs/).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import decode, train_step
from bench.common import device_name, git_commit, pick_device
from lrkv.io import read_metrics
from lrkv.training.monitor import device_peak_flops, mfu

ROOT = Path(__file__).resolve().parent.parent

# python train.py overrides of the train phase (shared by both modes) and per mode
TRAIN_COMMON = [
    "train.max_steps=30",
    "train.val_every=0",
    "train.log_every=5",
    "train.ckpt_every=0",
    "train.progress_bar=false",
    "optim.warmup_steps=5",
    "callbacks=none",
    "logger=csv",
    "run_name=suite_train",
]
TRAIN_GPU = [
    "model=lrkv_1b",
    "model.n_layer=4",
    "data.seq_len=2048",
    "data.batch_size=8",
    "train.batch_tokens=16384",
    "train.compile=true",
    "trainer=default",
]
TRAIN_QUICK = [
    "model=lrkv_tiny",
    "model.n_layer=2",
    "model.d_model=64",
    "model.head_dim=16",
    "model.max_seq_len=64",
    "data.source=embedded:topics",
    "data.seq_len=64",
    "data.batch_size=4",
    "tokenizer.vocab_size=512",
    "train.batch_tokens=256",
    "trainer=cpu",
    "train.peak_flops=1e12",  # a nominal CPU peak, so that the MFU arithmetic runs (not a CPU MFU claim)
]
TRAIN_STEP_GPU = [
    ["--size", "1b", "--layers", "8", "--batch", "8", "--seq", "2048", "--compile", "--warmup", "3", "--iters", "10"],
    ["--size", "128m", "--batch", "16", "--seq", "1024", "--compile", "--warmup", "3", "--iters", "10"],
]
TRAIN_STEP_QUICK = [["--tiny", "--peak-flops", "1e12"]]
DECODE_GPU = ["--size", "1b", "--layers", "4", "--context", "2048,8192", "--iters", "20"]
DECODE_QUICK = ["--tiny"]


def environment(device: torch.device, argv: list[str]) -> dict:
    try:
        import flash_attn  # noqa: F401

        flash = True
    except Exception:  # noqa: BLE001 - any failure means not usable
        flash = False
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "flash_attn": flash,
        "git_commit": git_commit(),
        "command": " ".join(["python -m bench.suite", *argv]),
    }


# ---- phases -------------------------------------------------------------------------------------
def train_phase(quick: bool, timeout: float) -> dict:
    """A real `python train.py` run in a subprocess; numbers from its metrics.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*TRAIN_COMMON, *(TRAIN_QUICK if quick else TRAIN_GPU)]
        overrides += [f"paths.output_dir={tmp}/out", f"paths.cache_dir={tmp}/cache"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
        env["HF_DATASETS_OFFLINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
        )
        wall = time.perf_counter() - start
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"train.py exited {proc.returncode}: {' | '.join(tail)}")
        run_dir = Path(tmp) / "out" / "runs" / "suite_train"
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if "train_loss" in r]
        summary = json.loads((run_dir / "summary.json").read_text())
        config = (run_dir / "config.yaml").read_text()
    first, last = rows[0], rows[-1]
    import yaml

    cfg = yaml.safe_load(config)
    from lrkv import ModelConfig, Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(cfg["model"]))
    flops_per_token = model.flops_per_token(int(cfg["data"]["seq_len"]))
    peak = cfg["train"].get("peak_flops") or device_peak_flops(pick_device(None))
    recomputed = mfu(flops_per_token, last["tokens_per_s"], peak)
    return {
        "command": "python train.py " + " ".join(overrides[:-2]),
        "model": summary["model"],
        "n_layer": cfg["model"]["n_layer"],
        "d_model": cfg["model"]["d_model"],
        "params": summary["params"],
        "steps": summary["steps"],
        "tokens_per_step": cfg["train"]["batch_tokens"],
        "first_loss": first["train_loss"],
        "last_loss": last["train_loss"],
        "loss_fell": last["train_loss"] < first["train_loss"],
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last.get("mfu"),
        "mfu_recomputed": recomputed,
        "peak_mem_gib": last.get("peak_mem_gib"),
        "wall_s": wall,
    }


def decode_argv(quick: bool) -> list[list[str]]:
    runs = [DECODE_QUICK if quick else DECODE_GPU]
    if "--attention-only" in inspect.getsource(decode):  # added to bench/decode.py in a later version
        runs.append([*runs[0], "--attention-only"])
    return runs


def run_phase(name: str, fn, deadline: float, results: dict) -> None:
    if time.perf_counter() > deadline:
        results[name] = {"skipped": "time budget (--budget-s) spent"}
        print(f"\n== {name}: skipped (time budget)")
        return
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - record it and go on with the next phase
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if isinstance(results[name], dict):
        results[name].setdefault("phase_s", time.perf_counter() - start)


# ---- output -------------------------------------------------------------------------------------
def fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return str(v)


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def markdown(result: dict) -> str:
    env = result["environment"]
    out = [
        f"### {env['date'][:10]} — {env['device']}" + (" (quick)" if result["quick"] else ""),
        "",
        f"`{env['command']}` · torch {env['torch']} (CUDA {env['cuda']}) · flash-attn {env['flash_attn']} · "
        f"commit {env['git_commit']} · {env['date']} · {result['wall_s']:.0f} s",
        "",
    ]
    train = result.get("train", {})
    out.append("**train.py** " + (f"`{train['command']}`" if "command" in train else ""))
    out.append("")
    if "first_loss" in train:
        cols = ["model", "n_layer", "d_model", "steps", "tokens_per_step", "first_loss", "last_loss"]
        cols += ["tokens_per_s", "mfu", "mfu_recomputed", "peak_mem_gib"]
        out += table([train], cols)
    else:
        out.append(f"- {train}")
    for i, rec in enumerate(result.get("train_step", [])):
        out += ["", f"**train_step** {i + 1}: `{rec.get('command', '')}`", ""]
        if "rows" in rec:
            cols = ["kind", "params_M", "tokens_per_s", "vs_mha", "mfu", "framework_tokens_per_s"]
            cols += ["framework_vs_bare", "framework_mfu", "mfu_logged", "peak_mem_GiB"]
            out += table(rec["rows"], cols)
        else:
            out.append(f"- {rec}")
    for rec in result.get("decode", []):
        out += ["", f"**decode**: `{rec.get('command', '')}`", ""]
        if "rows" in rec:
            cols = ["kind", "context", "cache_MiB", "cache_vs_mha", "ms_per_token", "speedup_vs_mha", "ideal_speedup"]
            out += table(rec["rows"], cols)
        else:
            out.append(f"- {rec}")
    return "\n".join(out) + "\n"


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (the tests run this)")
    p.add_argument("--budget-s", type=float, default=None, help="start no phase after this (default 540; quick 170)")
    p.add_argument("--out", default=None, help="results folder (default bench/results; quick outputs/bench-quick)")
    p.add_argument("--markdown", default=None, help="file the dated tables are appended to (default bench/RESULTS.md)")
    args = p.parse_args(argv)
    out = Path(args.out or (ROOT / ("outputs/bench-quick" if args.quick else "bench/results")))
    md = Path(args.markdown or (out / "RESULTS.md" if args.quick else ROOT / "bench" / "RESULTS.md"))
    budget = args.budget_s or (170 if args.quick else 540)
    device = torch.device("cpu") if args.quick else pick_device(None)
    if not args.quick and device.type != "cuda":
        print("no CUDA device: the full suite is meant for a GPU (use --quick on a CPU)", file=sys.stderr)
    if args.quick:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest (and fair on a shared machine)
    start = time.perf_counter()
    deadline = start + budget
    result = {"benchmark": "suite", "quick": args.quick, "environment": environment(device, argv)}
    print(json.dumps(result["environment"], indent=1))

    def train_fn():
        return train_phase(args.quick, timeout=deadline - time.perf_counter() + 60)

    run_phase("train", train_fn, deadline, result)
    steps = []
    for bench_args in TRAIN_STEP_QUICK if args.quick else TRAIN_STEP_GPU:
        holder: dict = {}
        argv_i = [*bench_args, "--device", device.type]
        run_phase("step", lambda a=argv_i: train_step.main(a), deadline, holder)
        steps.append({**holder["step"], "command": "python bench/train_step.py " + " ".join(argv_i)})
    result["train_step"] = steps
    decodes = []
    for bench_args in decode_argv(args.quick):
        holder = {}
        argv_i = [*bench_args, "--device", device.type]
        run_phase("decode", lambda a=argv_i: decode.main(a), deadline, holder)
        decodes.append({**holder["decode"], "command": "python bench/decode.py " + " ".join(argv_i)})
    result["decode"] = decodes
    result["wall_s"] = time.perf_counter() - start

    for rec in steps:
        if "rows" in rec:
            append_jsonl(out / "train_step.jsonl", rec)
    for rec in decodes:
        if "rows" in rec:
            append_jsonl(out / "decode.jsonl", rec)
    append_jsonl(out / "suite.jsonl", result)
    md.parent.mkdir(parents=True, exist_ok=True)
    with open(md, "a") as f:
        f.write("\n" + markdown(result))
    print(f"\nsuite: {result['wall_s']:.0f} s; records in {out}/, tables appended to {md}")
    return result


def problems(result: dict) -> list[str]:
    """Phases that failed or were skipped."""
    phases = [("train", result.get("train", {}))]
    phases += [("train_step", r) for r in result.get("train_step", [])] + [
        ("decode", r) for r in result.get("decode", [])
    ]
    return [f"{name}: {r.get('error') or r.get('skipped')}" for name, r in phases if "error" in r or "skipped" in r]


if __name__ == "__main__":
    bad = problems(main())
    for line in bad:
        print(f"suite: {line}", file=sys.stderr)
    sys.exit(1 if bad else 0)
