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
