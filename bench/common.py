"""Shared bits of the benchmarks: timing, device description, result records.

Every benchmark prints a table with ratios against a baseline measured in the same process, and
with --save appends a JSON record (device, date, command, numbers) to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of fn() after warmup calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def timed_loop(fn, device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Mean seconds per call of fn() over `iters` calls run back to back (synchronised at both ends only)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def record(name: str, device: torch.device, rows: list[dict], settings: dict, save: bool, **extra) -> dict:
    """The result record (extra keys go in as they are); with save, appended to bench/results/<name>.jsonl."""
    result = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings,
        "git_commit": git_commit(),
        "rows": rows,
        **extra,
    }
    if save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{name}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"appended to {path}")
    return result


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parser(doc: str, kinds: list[str], *, iters: int, tiny_help: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: preset size and depth, kinds, timing, device, --tiny, --save."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="preset size: tiny, 128m, 512m, 1b, 2b5, 6b3")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth (same width)")
    p.add_argument("--kinds", default=",".join(kinds))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--save", action="store_true", help="append the result to bench/results/<name>.jsonl")
    return p


def add_ratios(rows: list[dict], baseline: str = "mha", **ratios: tuple[str, bool]) -> None:
    """For each name=(metric, higher_is_better): row[name] = the row's metric relative to the baseline kind's."""
    base = next((r for r in rows if r["kind"] == baseline), rows[0])
    for r in rows:
        for name, (metric, higher) in ratios.items():
            r[name] = r[metric] / base[metric] if higher else base[metric] / r[metric]
