"""data=mixture (lrkv/data/mixture.py): weighted sources, deterministic draws, sharding, exact resume, errors."""

import json
import random

import pytest
import torch

from lrkv.data import token_byte_lengths, train_bpe
from lrkv.data.mixture import Mixture, MixtureLoader
from lrkv.errors import ConfigError, DataError

WORDS = {
    "web": "the cat sat on a mat while rain fell over quiet hills and rivers".split(),
    "code": "def return lambda yield import class self none true false".split(),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two local jsonl sources with disjoint words (the second under another text field)."""
    folder, rng = tmp_path_factory.mktemp("mixture"), random.Random(0)
    for name, field in (("web", "text"), ("code", "content")):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(80):
                f.write(json.dumps({field: " ".join(rng.choice(WORDS[name]) for _ in range(60))}) + "\n")
    return folder


def sources(files, web=0.75, code=0.25):
    return [
        {"name": "web", "source": str(files / "web.jsonl"), "weight": web},
        {"name": "code", "source": str(files / "code.jsonl"), "weight": code, "text_field": "content"},
    ]


@pytest.fixture(scope="module")
def tokenizer(files):
    return train_bpe(Mixture(sources(files)).documents("train"), 320)


def loader(files, tokenizer, *, seed=0, batch_size=4, rank=0, world=1, **weights) -> MixtureLoader:
    mixture = Mixture(sources(files, **weights), val_fraction=0.1)
    common = dict(seq_len=16, seed=seed, token_bytes=token_byte_lengths(tokenizer))
    return mixture.train_loader(tokenizer, batch_size=batch_size, rank=rank, world_size=world, **common)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_draws_follow_the_weights_and_rows_come_from_their_source(files, tokenizer):
    batches = take(iter(loader(files, tokenizer)), 100)
    drawn = torch.cat([b["source"] for b in batches])
    share = float((drawn == 1).double().mean())
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / len(drawn)) ** 0.5  # binomial, 4 sigma
    vocab = {name: set(words) for name, words in WORDS.items()}
    for batch in batches[:5]:
        for row, s in zip(batch["input"], batch["source"]):
            text = tokenizer.decode(row.tolist()).replace("<|endoftext|>", " ")
            words = {w for w in text.split()[1:-1]}  # the window may cut the first and last word
            assert words <= vocab[["web", "code"][int(s)]]


def test_the_mixture_is_deterministic_from_the_seed(files, tokenizer):
    a, b = take(iter(loader(files, tokenizer)), 6), take(iter(loader(files, tokenizer)), 6)
    c = take(iter(loader(files, tokenizer, seed=1)), 6)
    assert all(torch.equal(x["input"], y["input"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input"], y["input"]) for x, y in zip(a, c))


def test_ranks_split_the_global_rows_and_workers_stride(files, tokenizer):
    single = take(loader(files, tokenizer, batch_size=4).iter_batches(), 3)
    ranks = [take(loader(files, tokenizer, batch_size=2, rank=r, world=2).iter_batches(), 3) for r in (0, 1)]
    for k in range(3):  # global row (j * world + rank) of batch k
        merged = torch.stack([ranks[j % 2][k]["input"][j // 2] for j in range(4)])
        assert torch.equal(merged, single[k]["input"])
    odd = take(loader(files, tokenizer, batch_size=4).iter_batches(None, first=1, stride=2), 2)
    assert torch.equal(odd[0]["input"], single[1]["input"])


def test_state_resumes_exactly_and_counts_every_sources_windows(files, tokenizer):
    ref = loader(files, tokenizer)
    batches = take(iter(ref), 12)
    state = json.loads(json.dumps(ref.state_after(7)))  # JSON-serialisable, as checkpoints store it
    assert state["rows"] == 28 and sum(s["windows"] for s in state["sources"]) == 28
    drawn = torch.cat([b["source"] for b in batches[:7]])
    assert [s["windows"] for s in state["sources"]] == [int((drawn == 0).sum()), int((drawn == 1).sum())]
    assert ref.tokens_by_source(state) == {"web": 16 * int((drawn == 0).sum()), "code": 16 * int((drawn == 1).sum())}
    fresh = loader(files, tokenizer)
    fresh.load_state_dict(state)
    resumed = take(iter(fresh), 5)
    assert all(torch.equal(x["input"], y["input"]) for x, y in zip(resumed, batches[7:]))
    assert fresh.state_dict() == ref.state_dict()
    other = loader(files, tokenizer, web=0.5, code=0.5)
    with pytest.raises(DataError, match="resume with the same data.sources"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="not a mixture position"):
        fresh.load_state_dict({"epoch": 0, "index": 3})


def test_zero_weight_sources_are_validated_but_never_drawn(files, tokenizer):
    drawn = torch.cat([b["source"] for b in take(iter(loader(files, tokenizer, web=1.0, code=0)), 20)])
    assert bool((drawn == 0).all())
    mixture = Mixture(sources(files, web=1.0, code=0), val_fraction=0.1)
    val = mixture.val_loader(tokenizer, seq_len=16, batch_size=4, rank=0, world_size=1, token_bytes=None, max_batches=2)
    tags = [b["source"].unique().tolist() for b in val]
    assert tags == [[0], [0], [1], [1]] and len(val) == 4


@pytest.mark.parametrize(
    ("entries", "error", "words"),
    [
        ("not a list", ConfigError, "non-empty list of sources"),
        ([], ConfigError, "non-empty list of sources"),
        ([{"name": "a", "source": "embedded", "weight": -1}], ConfigError, r"\(a\) has weight -1; weights must be"),
        ([{"name": "a", "source": "embedded", "weight": "x"}], ConfigError, "weights must be finite numbers"),
        ([{"name": "a", "source": "embedded", "weight": 0}], ConfigError, "weights are all zero"),
        ([{"name": "a", "source": "embedded"}], ConfigError, r"data.sources\[0\] needs weight"),
        ([{"name": "a", "source": "embedded", "weight": 1, "wieght": 1}], ConfigError, "unknown key 'wieght'"),
        ([{"name": "a", "source": "embedded:nope", "weight": 1}], ConfigError, "embedded part 'nope' is unknown"),
        ([{"name": "a", "source": "/no/such/file.jsonl", "weight": 1}], DataError, r"\(a\): data path .* does not"),
        ([{"name": "a b", "source": "embedded", "weight": 1}], ConfigError, "must be letters"),
        ([{"name": "a", "source": "embedded", "weight": 1, "format": "chat"}], ConfigError, "needs conversations"),
        ([{"name": "a", "source": "embedded", "weight": 1, "format": "chatml"}], ConfigError, "'chatml' is unknown"),
        (
            [{"name": "a", "source": "embedded", "weight": 1}, {"name": "a", "source": "embedded", "weight": 1}],
            ConfigError,
            "used twice",
        ),
    ],
)
def test_bad_sources_are_one_line_errors(entries, error, words):
    with pytest.raises(error, match=words) as err:
        Mixture(entries)
    assert "\n" not in str(err.value)


def test_datamodule_refuses_streaming_a_mixture():
    from lrkv.data.datamodule import LMDataModule

    with pytest.raises(ConfigError, match="memory or shards, not stream"):
        LMDataModule("mixture", sources=[{"name": "a", "source": "embedded", "weight": 1}], storage="stream")


def test_a_hub_source_in_memory_needs_its_own_max_tokens():
    hub = {"name": "web", "source": "hf:someone/corpus", "weight": 1, "val_documents": 10}
    with pytest.raises(ConfigError, match="give it max_tokens, or set data.storage=shards") as err:
        Mixture([hub])
    assert "\n" not in str(err.value)
    Mixture([{**hub, "max_tokens": 1000}])  # capped: fine in memory
    Mixture([hub], storage="shards")  # shards hold the whole source on disk


def shard_loaders(files, tokenizer, cache_dir, seed=0):
    mixture = Mixture(sources(files), val_fraction=0.1, storage="shards", cache_dir=str(cache_dir))
    common = dict(seq_len=16, rank=0, world_size=1, token_bytes=token_byte_lengths(tokenizer))
    train = mixture.train_loader(tokenizer, batch_size=4, seed=seed, **common)
    val = mixture.val_loader(tokenizer, batch_size=4, max_batches=3, **common)
    return train, val


def test_shards_are_written_once_per_source_and_read_like_memory(files, tokenizer, tmp_path, monkeypatch):
    train, val = shard_loaders(files, tokenizer, tmp_path)
    folders = sorted(p.parent.name for p in (tmp_path / "shards").glob("*/train.json"))
    assert len(folders) == 2  # one shard folder per source
    batches = take(iter(train), 10)
    drawn = torch.cat([b["source"] for b in batches])
    mixture = Mixture(sources(files), val_fraction=0.1, storage="shards", cache_dir=str(tmp_path))
    for source in (0, 1):  # every row is a window of its own source's shards
        stream = mixture.tokens(source, "train", tokenizer)
        stream = stream.read(0, 0, stream.num_tokens()).astype("int64").tobytes()
        rows = torch.cat([b["input"][b["source"] == source] for b in batches])
        assert all(row.numpy().astype("int64").tobytes() in stream for row in rows)
    assert 0 < int((drawn == 1).sum()) < int((drawn == 0).sum())
    # validation windows are the same as from memory (neither reorders held-out documents)
    memory_val = Mixture(sources(files), val_fraction=0.1).val_loader(
        tokenizer, seq_len=16, batch_size=4, rank=0, world_size=1, token_bytes=None, max_batches=3
    )
    assert all(
        torch.equal(a["input"], b["input"]) and torch.equal(a["source"], b["source"]) for a, b in zip(val, memory_val)
    )
    assert len(list(val)) == len(list(memory_val)) == 6

    # a second run reads the same shards without tokenizing again, draws the same rows and resumes exactly
    def no_writes(*args, **kwargs):
        raise AssertionError("shards were written again")

    monkeypatch.setattr("lrkv.data.shards.write_documents", no_writes)
    again, _ = shard_loaders(files, tokenizer, tmp_path)
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(take(iter(again), 10), batches))
    resumed, _ = shard_loaders(files, tokenizer, tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(train.state_after(6))))
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(take(iter(resumed), 4), batches[6:]))


@pytest.mark.slow
def test_training_on_a_mixture_logs_per_source_and_resumes_exactly(files, tmp_path):
    from test_train import StopAt
    from train_helpers import read_rows, tiny_overrides, train_in_process, train_losses, val_losses

    from lrkv.errors import TrainingInterrupted

    listed = (
        f"[{{name:web,source:{files / 'web.jsonl'},weight:0.75}},"
        f"{{name:code,source:{files / 'code.jsonl'},weight:0.25,text_field:content}}]"
    )
    extra = {"data": "mixture", "data.source": "mixture", "data.sources": listed, "data.val_fraction": 0.25}
    extra["train.val_every"] = 2
    overrides = tiny_overrides(tmp_path, tmp_path / "cache", steps=6, **extra)
    full = tmp_path / "full"
    train_in_process(overrides, full)
    rows = read_rows(full / "metrics.csv")
    assert {"tokens/web", "tokens/code", "val_loss/web", "val_loss/code", "val_bpb/code"} <= set(rows[0])
    for row in rows:
        if row["train_loss"]:
            assert int(row["tokens/web"]) + int(row["tokens/code"]) == int(row["step"]) * 512  # train.batch_tokens
        if row["val_loss"]:
            low, high = sorted([float(row["val_loss/web"]), float(row["val_loss/code"])])
            assert low <= float(row["val_loss"]) <= high
    # evaluate.py's held-out loss of the finished run scores every source as training validated them
    from train_helpers import evaluate

    final = [r for r in rows if r["val_loss"]][-1]
    out = evaluate(tmp_path / "eval", "mode=loss", f"ckpt={full}")
    scored = json.loads((tmp_path / "eval" / "loss.json").read_text())
    assert scored["sources"] == ["web", "code"] and "code: loss" in out["text"]
    assert scored["loss"] == pytest.approx(float(final["val_loss"]), abs=1e-4)
    for name in ("web", "code"):
        assert scored[f"val_loss/{name}"] == pytest.approx(float(final[f"val_loss/{name}"]), abs=1e-4)
        assert scored[f"val_bpb/{name}"] == pytest.approx(float(final[f"val_bpb/{name}"]), abs=1e-4)
    assert scored["logged_val_loss"] == pytest.approx(float(final["val_loss"]))
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train_in_process(overrides, part, callbacks=[StopAt(4)])
    train_in_process(overrides + ["ckpt_path=last"], part)
    assert train_losses(part) == pytest.approx(train_losses(full), abs=1e-6)
    assert val_losses(part) == pytest.approx(val_losses(full), abs=1e-6)
    tokens = [(r["step"], r["tokens/web"]) for r in read_rows(part / "metrics.csv") if r["train_loss"]]
    assert tokens == [(r["step"], r["tokens/web"]) for r in rows if r["train_loss"]]
