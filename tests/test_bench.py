"""The benchmarks run (at tiny sizes on CPU) and report ratios against MHA measured in the same process."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode, train_step  # noqa: E402


def test_train_step_bench_runs_every_kind():
    result = train_step.main(["--tiny"])
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == set(train_step.KINDS)
    assert rows["mha"]["vs_mha"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["lrkv"]["params_M"] == rows["lrkv_folded"]["params_M"]
    assert result["device"] and result["command"]


def test_decode_bench_measures_cache_ratios():
    result = decode.main(["--tiny"])
    rows = {r["kind"]: r for r in result["rows"]}
    assert rows["mha"]["cache_vs_mha"] == 1.0
    assert rows["lrkv"]["cache_vs_mha"] == pytest.approx(1 / 4 + 8 / 32)  # lrkv_tiny: H = 4, r = 8, d_h = 32
    assert rows["mqa"]["cache_vs_mha"] == pytest.approx(1 / 4)
    assert rows["lrkv"]["ideal_speedup"] == pytest.approx(2.0)
