"""KV capacity and the bandwidth-bound decode ideal (lrkv/evaluation/footprint.py)."""

import pytest

from lrkv import ConfigError
from lrkv.evaluation.footprint import (
    footprint_table,
    ideal_decode_step_s,
    ideal_decode_tokens_per_s,
    kv_capacity_tokens,
)


def test_capacity_and_ideal_decode_by_hand():
    gib = 2**30
    # 80 GiB, 2 GiB of weights, 1 MiB per cached token: 78 Ki tokens
    assert kv_capacity_tokens(80 * gib, 2 * gib, 2**20) == 78 * 1024
    assert kv_capacity_tokens(1 * gib, 2 * gib, 2**20) == 0  # weights alone do not fit
    # 2 GB of weights + 4 x 1000 tokens x 1e5 B = 2.4 GB at 1.2 TB/s: 2 ms per step, 4 sequences -> 2000 tok/s
    assert ideal_decode_step_s(2e9, 4, 1000, 1e5, 1.2e12) == pytest.approx(2e-3)
    assert ideal_decode_tokens_per_s(2e9, 4, 1000, 1e5, 1.2e12) == pytest.approx(2000)


def test_footprint_capacity_columns_follow_the_cache_ratio():
    rows = {
        r["attention"]: r
        for r in footprint_table(["mha_1b", "lrkv_1b", "mqa_1b"], context=4096, batch_size=8, memory_gib=80)
    }
    mha, lrkv, mqa = rows["mha"], rows["lrkv"], rows["mqa"]
    for r in rows.values():
        spare = 80 * 2**30 - 2 * r["params"]
        assert (
            r["max_cached_tokens"] == spare // r["kv_bytes_per_token"]
            and r["max_batch"] == r["max_cached_tokens"] // 4096
        )
        step = (2 * r["params"] + 8 * 4096 * r["kv_bytes_per_token"]) / 3.35e12
        assert r["ideal_decode_tok_s"] == pytest.approx(8 / step)
    assert mqa["max_batch"] > lrkv["max_batch"] > 1.9 * mha["max_batch"]  # LRKV cache: 0.48 of MHA's
    assert mqa["ideal_decode_tok_s"] > lrkv["ideal_decode_tok_s"] > mha["ideal_decode_tok_s"]
    assert "max_batch" not in footprint_table(["mha_1b"])[0]  # only with memory_gib


@pytest.mark.parametrize("option", [{"memory_gib": 0}, {"memory_gib": -3}, {"hbm_tb_s": 0, "memory_gib": 80}])
def test_bad_capacity_options_are_one_line_errors(option):
    with pytest.raises(ConfigError) as err:
        footprint_table(["mha_1b"], **option)
    assert next(iter(option)) in str(err.value) and "\n" not in str(err.value)
