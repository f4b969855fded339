"""batch_size=auto for lm-eval: parsing, the out-of-memory halving search, the CPU estimate, and that
the batch chosen scores exactly like any fixed batch."""

from pathlib import Path

import pytest
import torch
from helpers import random_model

from lrkv.data.tokenizer import train_bpe
from lrkv.errors import ConfigError
from lrkv.evaluation import batching
from lrkv.io.pretrained import Pretrained


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", None), ("auto:4", None), ("AUTO", None), (None, None), ("8", 8), (3, 3)]
)
def test_parse_batch_size(value, expected):
    assert batching.parse_batch_size(value) == expected


@pytest.mark.parametrize("value", ["eight", 0, "-2", "1.5"])
def test_bad_batch_size_is_a_one_line_error(value):
    with pytest.raises(ConfigError, match="batch_size"):
        batching.parse_batch_size(value)


def test_largest_that_runs_halves_on_out_of_memory_only():
    tried = []

    def attempt(b):
        tried.append(b)
        if b > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert batching.largest_that_runs(attempt, 64) == 4
    assert tried == [64, 32, 16, 8, 4]

    def broken(b):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory"):
        batching.largest_that_runs(broken, 8)

    def never(b):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(ConfigError, match="max_length"):
        batching.largest_that_runs(never, 4)


def test_cpu_estimate_is_the_largest_power_of_two_that_fits():
    cfg = random_model("lrkv").cfg
    row = batching.row_bytes(cfg, 64, 4)
    assert batching.row_bytes(cfg, 128, 4) == 2 * row  # linear in length
    assert batching.row_bytes(cfg, 64, 2) < row  # smaller dtype, smaller rows
    assert batching.estimated_batch(cfg, 64, 4, memory_bytes=2 * 11 * row, max_batch_size=64) == 8  # 11 fit
    assert batching.estimated_batch(cfg, 64, 4, memory_bytes=2 * 1000 * row, max_batch_size=64) == 64  # capped
    assert batching.estimated_batch(cfg, 64, 4, memory_bytes=row // 3, max_batch_size=64) == 1  # never below 1


@pytest.fixture(scope="module")
def pretrained():
    text = "the quick brown fox jumps over the lazy dog; " * 20
    tok = train_bpe([text, text.upper()], 300)
    return Pretrained(random_model("lrkv", vocab_size=300), tok, Path("tiny"))


def test_auto_batch_on_cpu_scores_like_batch_one(pretrained, monkeypatch):
    from lrkv.evaluation.lm_eval_model import LrkvLM

    row = batching.row_bytes(pretrained.model.cfg, pretrained.model.cfg.max_seq_len, 4)
    monkeypatch.setattr(batching, "available_memory_bytes", lambda: 2 * 5 * row)  # 5 rows fit -> 4
    auto = LrkvLM(checkpoint=pretrained, batch_size="auto")
    assert auto.batch_size == 4 and auto.batch_size_requested == "auto"
    capped = LrkvLM(checkpoint=pretrained, batch_size="auto:3", max_batch_size=2)
    assert capped.batch_size == 2
    one = LrkvLM(checkpoint=pretrained, batch_size=1)
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(0, 300, (n,), generator=g).tolist(), torch.randint(0, 300, (m,), generator=g).tolist())
        for n, m in [(5, 2), (30, 4), (1, 1), (12, 7), (60, 3), (9, 9), (2, 5)]
    ]
    for (s_auto, g_auto), (s_one, g_one) in zip(auto.score_tokens(pairs), one.score_tokens(pairs)):
        assert s_auto == pytest.approx(s_one, abs=1e-4) and g_auto == g_one
