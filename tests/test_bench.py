"""The benchmarks run (at tiny sizes on CPU) and report ratios against MHA measured in the same process;
the GPU suite's --quick pipeline produces every record; MFU peaks and the one MFU formula."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import decode, suite, train_step  # noqa: E402
from lrkv.training.monitor import mfu, peak_flops_for_name  # noqa: E402


def finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_train_step_bench_runs_every_kind_bare_and_framework(one_thread):
    result = train_step.main(["--tiny", "--peak-flops", "1e12"])
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == set(train_step.KINDS)
    assert rows["mha"]["vs_mha"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["lrkv"]["params_M"] == rows["lrkv_folded"]["params_M"]
    for r in rows.values():
        assert finite_positive(r["framework_vs_bare"]) and finite_positive(r["mfu"])
        assert finite_positive(r["mfu_logged"])  # TrainMonitor's metrics row of the timed steps
    assert result["device"] and result["command"] and result["torch"]


def test_decode_bench_measures_cache_ratios():
    result = decode.main(["--tiny"])
    rows = {r["kind"]: r for r in result["rows"]}
    assert rows["mha"]["cache_vs_mha"] == 1.0
    assert rows["lrkv"]["cache_vs_mha"] == pytest.approx(1 / 4 + 8 / 32)  # lrkv_tiny: H = 4, r = 8, d_h = 32
    assert rows["mqa"]["cache_vs_mha"] == pytest.approx(1 / 4)
    assert rows["lrkv"]["ideal_speedup"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA B200", 2250),
        ("NVIDIA GeForce RTX 4090", 165),
        ("NVIDIA L4", 121),
    ],
)
def test_mfu_peaks_from_real_device_names(name, tflops):
    assert peak_flops_for_name(name) == tflops * 1e12
    assert peak_flops_for_name("Some Future GPU") is None


def test_mfu_formula():
    assert mfu(6e9, 1e5, 1e15) == pytest.approx(0.6) and mfu(6e9, 1e5, 1e15, devices=2) == pytest.approx(0.3)
    assert mfu(6e9, 1e5, None) is None


@pytest.mark.slow
def test_quick_suite_records_every_phase(tmp_path):
    """`python -m bench.suite --quick`: a real train.py run whose loss falls, the train-step benchmark of every
    kind with framework_vs_bare, the decode benchmark, records and a dated markdown section. A generous
    --budget-s: speed is not what this checks, and a slow machine must not skip phases."""
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.suite", "--quick", "--budget-s", "900", "--out", str(out), "--markdown", str(md)],
        cwd=ROOT,
        env={**suite.os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads((out / "suite.jsonl").read_text().splitlines()[-1])
    assert result["quick"] and result["environment"]["torch"] and result["environment"]["date"]
    train = result["train"]
    assert train["steps"] == 30 and train["loss_fell"] and train["last_loss"] < train["first_loss"] - 0.3
    # metrics.csv's MFU is the benchmark's formula (lrkv.training.monitor.mfu) of the logged tokens/s
    assert train["mfu"] == pytest.approx(train["mfu_recomputed"], rel=1e-4)
    (step,) = result["train_step"]
    rows = {r["kind"]: r for r in step["rows"]}
    assert set(rows) == set(train_step.KINDS)
    for r in rows.values():
        assert all(finite_positive(r[k]) for k in ("tokens_per_s", "vs_mha", "framework_vs_bare", "mfu"))
    assert {r["kind"] for r in result["decode"][0]["rows"]} == set(decode.KINDS)
    assert (out / "train_step.jsonl").exists() and (out / "decode.jsonl").exists()
    text = md.read_text()
    assert "framework_vs_bare" in text and result["environment"]["date"] in text and "(quick)" in text


def test_attention_only_decode_bench_measures_every_kind(one_thread):
    result = decode.main(["--attention-only", "--tiny"])
    rows = {(r["kind"], r["batch"]): r for r in result["rows"]}
    assert {kind for kind, _ in rows} == set(decode.ATTENTION_KINDS) and {b for _, b in rows} == {1, 2}
    by = {kind: rows[(kind, 2)] for kind in decode.ATTENTION_KINDS}
    assert by["mha"]["speedup_vs_mha"] == 1.0 and by["mha"]["MB_read"] == 2 * rows[("mha", 1)]["MB_read"]
    assert by["lrkv"]["bytes_vs_mha"] == pytest.approx(1 / 4 + 8 / 32)  # bytes read = the kind's cache
    assert by["mqa"]["bytes_vs_mha"] == pytest.approx(1 / 4)
    assert by["lrkv_decoupled"]["MB_read"] == by["lrkv"]["MB_read"]
    assert all(r["ms"] > 0 and r["GB_s"] > 0 for r in result["rows"])
    assert result["device"] and result["command"] and result["date"]


BLOCKER = """
import sys
from importlib.machinery import PathFinder

ABSENT = {"datasets", "wandb", "lm_eval"}


class _Absent(PathFinder):  # as if not installed: find_spec finds nothing, import raises ModuleNotFoundError
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in ABSENT else PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_Absent if f is PathFinder else f for f in sys.meta_path]
"""


@pytest.mark.slow
def test_train_py_runs_without_datasets_wandb_and_lm_eval(tmp_path):
    """The GPU image lacks datasets, wandb and lm-eval: the suite's train.py run must not import them."""
    from train_helpers import run_script, tiny_overrides

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    check = subprocess.run(
        [sys.executable, "-c", "import datasets"],
        env={**suite.os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
    )
    assert check.returncode != 0  # the blocker works
    args = tiny_overrides(tmp_path / "out", tmp_path / "cache", model="lrkv_tiny", steps=2, **{"logger": "csv"})
    result = run_script(args, tmp_path, PYTHONPATH=f"{site}{suite.os.pathsep}{ROOT}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "runs" / "run" / "summary.json").exists()
