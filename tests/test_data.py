"""Tests of the data pipeline (lrkv/data): corpora, tokenizer, packing, loaders, shards, datamodule.

Small and offline: the embedded ``pydoc_data`` topics, BPE vocab 512, short sequences.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from lrkv.data import corpus as corpus_mod
from lrkv.data.corpus import CorpusSpec, embedded_documents, is_validation, iter_documents
from lrkv.data.loader import BatchLoader, InMemoryTokens, make_dataloader
from lrkv.data.packing import inputs_and_targets, num_windows, pack_documents, token_dtype, window
from lrkv.data.shards import ShardTokens, read_index, write_shards
from lrkv.data.tokenizer import (
    EOS_TOKEN,
    Tokenizer,
    load_or_train_bpe,
    padded_vocab_size,
    token_byte_lengths,
    train_bpe,
)
from lrkv.errors import ConfigError, DataError

TOPICS = CorpusSpec(source="embedded:topics", val_fraction=0.2)


@pytest.fixture(scope="module")
def topics() -> list[str]:
    return embedded_documents("topics")


@pytest.fixture(scope="module")
def tok(topics) -> Tokenizer:
    return train_bpe(topics[:40], 512)


def distinct_source(n: int = 1000, **kwargs) -> InMemoryTokens:
    """Tokens 1..n-1 then EOS 0: every window is identified by its first token."""
    return InMemoryTokens([np.arange(1, n)], eos_id=0, **kwargs)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def first_tokens(batches: list[dict]) -> list[int]:
    return [int(t) for b in batches for t in b["input"][:, 0]]


def one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------- corpora


def test_split_is_deterministic_disjoint_and_covers_the_corpus(topics):
    train, val = list(iter_documents(TOPICS, "train")), list(iter_documents(TOPICS, "val"))
    assert train == list(iter_documents(TOPICS, "train"))
    assert val == list(iter_documents(TOPICS, "val"))
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(topics)
    other = list(iter_documents(CorpusSpec(source="embedded:topics", val_fraction=0.2, split_seed=1), "val"))
    assert other != val  # the split seed changes the held-out set


def test_held_out_fraction_follows_val_fraction():
    texts = [f"document {i}" for i in range(20000)]
    share = sum(is_validation(t, 0.1, 0) for t in texts) / len(texts)
    assert 0.09 < share < 0.11
    assert not any(is_validation(t, 0.0, 0) for t in texts)


def test_embedded_corpus_size_and_max_documents():
    docs = embedded_documents()  # topics + stdlib docstrings (about 4 s, parsed with ast)
    assert len(docs) > 500 and sum(map(len, docs)) > 2_000_000
    assert embedded_documents() == docs
    head = CorpusSpec(source="embedded", max_documents=30, val_fraction=0.5)
    both = list(iter_documents(head, "train")) + list(iter_documents(head, "val"))
    assert sorted(both) == sorted(docs[:30])


@pytest.fixture
def local_files(tmp_path):
    """The same 6 documents as jsonl (field 'body'), parquet and txt files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i}: some text.\nA second line, é {i}." for i in range(6)]
    (tmp_path / "jsonl").mkdir()
    for part in range(2):
        with open(tmp_path / "jsonl" / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[part * 3 : (part + 1) * 3]:
                f.write(json.dumps({"body": d, "id": 1}) + "\n")
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "parquet" / "data.parquet")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(d + "\n\nAnother paragraph.\n", encoding="utf-8")
    return tmp_path, docs


@pytest.mark.parametrize("streaming", [True, False])
def test_local_jsonl_parquet_txt_through_datasets(local_files, streaming):
    root, docs = local_files

    def read(source, **kw):
        spec = CorpusSpec(source=source, val_fraction=0.0, streaming=streaming, **kw)
        return list(iter_documents(spec, "train", hf_cache_dir=str(root / "hf")))

    assert read(str(root / "jsonl"), text_field="body") == docs  # directory, two files in order
    assert read(str(root / "jsonl" / "*.jsonl"), text_field="body") == docs  # glob
    assert read(str(root / "parquet" / "data.parquet")) == docs
    assert read(str(root / "txt")) == [d + "\n\nAnother paragraph.\n" for d in docs]
    paragraphs = read(str(root / "txt"), txt_unit="paragraph")
    assert paragraphs[:2] == [docs[0], "Another paragraph.\n"] and len(paragraphs) == 12


def test_local_explicit_validation_files(local_files):
    root, docs = local_files
    spec = CorpusSpec(
        source=str(root / "jsonl" / "part0.jsonl"), val_split=str(root / "jsonl" / "part1.jsonl"), text_field="body"
    )
    assert list(iter_documents(spec, "train")) == docs[:3]
    assert list(iter_documents(spec, "val")) == docs[3:]


def test_hub_code_path_streams_a_local_dataset_directory(tmp_path, monkeypatch):
    """'hf:<dir>' runs the hub reader (load_dataset(name, streaming=True)) on local files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for split, n in (("train", 8), ("validation", 3)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} document {i}"}) + "\n")
    explicit = CorpusSpec(source=f"hf:{tmp_path}", val_split="validation")
    assert list(iter_documents(explicit, "train")) == [f"train document {i}" for i in range(8)]
    assert list(iter_documents(explicit, "val")) == [f"validation document {i}" for i in range(3)]
    hashed = CorpusSpec(source=f"hf:{tmp_path}", val_fraction=0.5)
    train, val = list(iter_documents(hashed, "train")), list(iter_documents(hashed, "val"))
    assert sorted(train + val) == sorted(f"train document {i}" for i in range(8))
    assert not set(train) & set(val)


def test_missing_path_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nope" / "corpus.jsonl")
    with pytest.raises(DataError) as e:
        list(iter_documents(CorpusSpec(source=missing)))
    one_line_error(e, missing, "data=embedded")


def test_bad_local_files_are_one_line_errors(local_files):
    root, _ = local_files
    with pytest.raises(DataError) as e:  # default text_field "text" is not in these rows
        list(iter_documents(CorpusSpec(source=str(root / "jsonl"))))
    one_line_error(e, "'text'", "body", "text_field")
    (root / "jsonl" / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError) as e:
        list(iter_documents(CorpusSpec(source=str(root / "jsonl"), text_field="body")))
    one_line_error(e, "mixed file types")


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("streaming", [True, False])
def test_hub_offline_fails_fast_with_the_fix(monkeypatch, tmp_path, var, streaming):
    """Offline, the hub reader fails at once, without a network attempt."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    spec = CorpusSpec(source="hf:HuggingFaceFW/fineweb-edu", name="sample-10BT", streaming=streaming)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        next(iter_documents(spec, "train", hf_cache_dir=str(tmp_path)))
    assert time.monotonic() - start < 5
    one_line_error(e, "HuggingFaceFW/fineweb-edu", "sample-10BT", "data=embedded", var)


def test_hub_unreachable_without_offline_flag_does_not_retry(monkeypatch):
    """No offline variable, no network: the TCP probe fails and load_dataset is never called."""
    import socket

    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    assert corpus_mod.source_kind("HuggingFaceFW/fineweb-edu") == "hub"
    with pytest.raises(DataError) as e:
        next(iter_documents(CorpusSpec(source="HuggingFaceFW/fineweb-edu"), "train"))
    one_line_error(e, "HuggingFaceFW/fineweb-edu", "unreachable", "HF_DATASETS_OFFLINE=1")


def test_bad_spec_values_are_config_errors():
    with pytest.raises(ConfigError):
        CorpusSpec(val_fraction=1.0)
    with pytest.raises(ConfigError):
        list(iter_documents(CorpusSpec(source="embedded:nothing")))
    with pytest.raises(ConfigError):
        list(iter_documents(TOPICS, "test"))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(tok, topics):
    assert tok.vocab_size == 512 and tok.is_byte_level
    samples = topics[40:45] + ["héllo wörld 🙂\t\n\n  x", "", "emoji 🧪 and 中文 and \x00 bytes"]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]


def test_literal_end_of_text_in_a_document_is_not_the_eos_token(tok):
    ids = tok.encode(f"a {EOS_TOKEN} b")
    assert tok.eos_id not in ids and tok.decode(ids) == f"a {EOS_TOKEN} b"
    assert tok.decode([tok.eos_id]) == EOS_TOKEN


def test_bpe_training_is_deterministic_and_uses_the_vocab(topics, tok):
    again = train_bpe(topics[:40], 512)
    assert again.sha256 == tok.sha256
    assert train_bpe(topics[:20], 512).sha256 != tok.sha256
    text = topics[41]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())  # merges were learned
    with pytest.raises(ConfigError):
        train_bpe(topics[:2], 200)


def test_tokenizer_cache_trains_once_and_reloads(tmp_path, topics):
    calls = []

    def texts():
        calls.append(1)
        return iter(topics[:20])

    key = {"corpus": "topics[:20]"}
    first = load_or_train_bpe(texts, vocab_size=400, cache_dir=str(tmp_path), corpus_key=key)
    second = load_or_train_bpe(texts, vocab_size=400, cache_dir=str(tmp_path), corpus_key=key)
    assert len(calls) == 1 and first.sha256 == second.sha256
    assert second.encode(topics[30]) == first.encode(topics[30])
    load_or_train_bpe(texts, vocab_size=300, cache_dir=str(tmp_path), corpus_key=key)
    load_or_train_bpe(texts, vocab_size=400, cache_dir=str(tmp_path), corpus_key={"other": 1})
    assert len(calls) == 3  # vocab size and corpus are part of the key
    saved = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert all(f.endswith(".json") for f in saved)  # JSON only, no pickles, no temp files


def test_save_load_and_gpt2_vocab_merges_files(tmp_path, tok, topics):
    loaded = Tokenizer.load(tok.save(str(tmp_path / "a")))
    vocab, merges = tok.save_vocab_merges(str(tmp_path / "gpt2"))
    assert open(merges, encoding="utf-8").readline().startswith("#version")  # GPT-2 file format
    from_dir = Tokenizer.load(str(tmp_path / "gpt2"))
    from_files = Tokenizer.from_gpt2_files(vocab, merges)
    for other in (loaded, from_dir, from_files):
        assert other.eos_id == tok.eos_id and other.vocab_size == tok.vocab_size
        assert other.encode(topics[50]) == tok.encode(topics[50])
        assert other.decode(other.encode("a 🙂 b")) == "a 🙂 b"
    with pytest.raises(DataError) as e:
        Tokenizer.load(str(tmp_path / "missing.json"))
    one_line_error(e, "missing.json")


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(1) == 128 and padded_vocab_size(129, 64) == 192


def test_token_byte_lengths_sum_to_utf8_bytes(tok, topics):
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == torch.long and lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eos_id] == 0 and lengths.max() > 1
    for text in topics[40:43] + ["héllo 🙂 中文\n", f"x {EOS_TOKEN} y"]:
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ----------------------------------------------------------------------------- packing, loader


def test_pack_documents_and_windows():
    stream = pack_documents([[5, 6], [7]], eos_id=0)
    assert stream.tolist() == [5, 6, 0, 7, 0]
    assert num_windows(5, 2) == 2 and num_windows(4, 2) == 1 and num_windows(1, 2) == 0
    assert window(stream, 1, 2).tolist() == [0, 7, 0]
    inputs, targets = inputs_and_targets(np.stack([window(stream, 0, 2), window(stream, 1, 2)]))
    assert inputs.tolist() == [[5, 6], [0, 7]] and targets.tolist() == [[6, 0], [7, 0]]
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_batches_are_contiguous_windows_with_shifted_targets():
    source = distinct_source(1000)
    loader = BatchLoader(source, seq_len=16, batch_size=4, shuffle=False)
    batches = take(iter(loader), 3)
    for k, batch in enumerate(batches):
        assert batch["input"].shape == batch["target"].shape == (4, 16)
        assert batch["input"].dtype == torch.long
        for j in range(4):
            start = (k * 4 + j) * 16 + 1  # token values are positions + 1
            assert batch["input"][j].tolist() == list(range(start, start + 16))
            assert batch["target"][j].tolist() == list(range(start + 1, start + 17))


def test_order_is_deterministic_from_the_seed_and_changes_per_epoch(tok, topics):
    def batches(seed, n=40):
        source = InMemoryTokens.from_texts(topics[:10], tok, shuffle_documents=True, seed=seed)
        return take(iter(BatchLoader(source, seq_len=32, batch_size=4, seed=seed)), n)

    a = batches(1)
    assert same_batches(a, batches(1))
    assert not same_batches(a[:5], batches(2)[:5])
    loader = BatchLoader(distinct_source(400), seq_len=8, batch_size=7, seed=3)
    per_epoch = loader.epoch_windows(0)
    firsts = first_tokens(take(iter(loader), 3 * per_epoch // 7))
    epoch0, epoch1 = firsts[:per_epoch], firsts[per_epoch : 2 * per_epoch]
    assert len(set(epoch0)) == per_epoch  # no window repeats within an epoch
    assert epoch0 != epoch1  # a new order (and offset) each epoch


@pytest.mark.parametrize("where", ["first epoch", "across epochs"])
def test_exact_resume_in_memory(tok, topics, where):
    docs = topics[:10] if where == "first epoch" else sorted(topics, key=len)[:3]  # few tokens

    def loader():
        source = InMemoryTokens.from_texts(docs, tok, shuffle_documents=True, seed=7)
        return BatchLoader(source, seq_len=32, batch_size=4, seed=7, token_bytes=token_byte_lengths(tok))

    original = loader()
    stream = iter(original)
    take(stream, 7)
    state = json.loads(json.dumps(original.state_dict()))  # plain JSON
    expected = take(stream, 5)
    restored = loader()
    restored.load_state_dict(state)
    assert same_batches(take(iter(restored), 5), expected)
    if where == "across epochs":
        assert original.state_dict()["epoch"] >= 1
    assert original.state_after(12) == original.state_dict()


def test_exact_resume_from_token_shards(tmp_path, tok, topics):
    write_shards(topics[:12], tok, str(tmp_path), "train", shard_tokens=5000)
    assert len(read_index(str(tmp_path), "train")["files"]) > 1  # windows span files

    def loader():
        return BatchLoader(ShardTokens(str(tmp_path), "train"), seq_len=64, batch_size=4, seed=5)

    original = loader()
    stream = iter(original)
    take(stream, 7)
    state = json.loads(json.dumps(original.state_dict()))
    expected = take(stream, 5)
    restored = loader()
    restored.load_state_dict(state)
    assert same_batches(take(iter(restored), 5), expected)


def test_resume_with_other_settings_is_refused():
    state = BatchLoader(distinct_source(), seq_len=16, batch_size=2, seed=1).state_dict()
    for kwargs in ({"seq_len": 8, "seed": 1}, {"seq_len": 16, "seed": 2}):
        other = BatchLoader(distinct_source(), batch_size=2, **kwargs)
        with pytest.raises(DataError) as e:
            other.load_state_dict(state)
        one_line_error(e, "same data settings")


@pytest.mark.parametrize("infinite", [True, False])
def test_ranks_see_disjoint_parts_that_cover_the_epoch(infinite):
    world, batch_size = 3, 4
    per_epoch = BatchLoader(distinct_source(2000), seq_len=16, batch_size=1, shuffle=infinite).epoch_windows(0)
    seen = []
    for rank in range(world):
        loader = BatchLoader(
            distinct_source(2000),
            seq_len=16,
            batch_size=batch_size,
            seed=4,
            shuffle=infinite,
            infinite=infinite,
            rank=rank,
            world_size=world,
        )
        if infinite:
            batches = take(iter(loader), per_epoch // (batch_size * world))
        else:
            batches = list(loader)
            assert len(batches) == len(loader)
        seen.append(first_tokens(batches))
        again = BatchLoader(
            distinct_source(2000),
            seq_len=16,
            batch_size=batch_size,
            seed=4,
            shuffle=infinite,
            infinite=infinite,
            rank=rank,
            world_size=world,
        )
        assert first_tokens(take(iter(again), 2)) == seen[-1][: 2 * batch_size]
    assert len({len(s) for s in seen}) == 1  # every rank runs the same number of batches
    together = [t for s in seen for t in s]
    assert len(set(together)) == len(together)  # disjoint
    assert len(together) >= per_epoch - batch_size * world  # covers the epoch
    if not infinite:
        assert sorted(together) == [1 + 16 * i for i in range(per_epoch // world * world)]


def test_validation_pass_is_finite_repeatable_and_counts_every_byte(tok, topics):
    lengths = token_byte_lengths(tok)
    source = InMemoryTokens.from_texts(topics[:5], tok)
    loader = BatchLoader(source, seq_len=64, batch_size=3, shuffle=False, infinite=False, token_bytes=lengths)
    first, second = list(loader), list(loader)
    assert same_batches(first, second) and len(first) == len(loader)
    assert first[-1]["input"].shape[0] <= 3
    covered = num_windows(source.num_tokens(), 64) * 64
    targets = torch.from_numpy(source.tokens[1 : covered + 1].astype(np.int64))
    assert sum(int(b["bytes"].sum()) for b in first) == int(lengths[targets].sum())
    for b in first:
        assert torch.equal(b["bytes"], lengths[b["target"]].sum(dim=1))
    all_bytes = int(lengths[torch.from_numpy(source.tokens.astype(np.int64))].sum())
    assert all_bytes == sum(len(d.encode()) for d in topics[:5])
    assert len(BatchLoader(source, seq_len=64, batch_size=3, shuffle=False, infinite=False, max_batches=2)) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_give_the_same_batches(num_workers):
    loader = BatchLoader(distinct_source(3000), seq_len=16, batch_size=4, seed=9)
    start = loader.state_after(3)
    expected = take(loader.iter_batches(start), 10)
    got = take(iter(make_dataloader(loader, start, num_workers=num_workers)), 10)
    assert same_batches(got, expected)


def test_too_little_data_is_a_one_line_error():
    with pytest.raises(DataError) as e:
        BatchLoader(distinct_source(20), seq_len=16, batch_size=1, world_size=2)
    one_line_error(e, "too little data", "seq_len")


# ----------------------------------------------------------------------------- shards


def test_shards_match_in_memory_tokens_and_are_checked(tmp_path, tok, topics):
    index = write_shards(topics[:8], tok, str(tmp_path), "val", shard_tokens=10000)
    assert np.dtype(index["dtype"]) == np.uint16 and index["num_documents"] == 8
    assert index["tokenizer_sha256"] == tok.sha256
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    shards = ShardTokens(str(tmp_path), "val", tokenizer_sha256=tok.sha256)
    memory = InMemoryTokens.from_texts(topics[:8], tok)
    assert shards.num_tokens() == memory.num_tokens() == index["num_tokens"]
    assert np.array_equal(shards.read(0, 0, shards.num_tokens()), memory.tokens)
    assert np.array_equal(shards.read(3, 9990, 25), memory.tokens[9990:10015])
    with pytest.raises(DataError) as e:
        ShardTokens(str(tmp_path), "val", tokenizer_sha256="0" * 64)
    one_line_error(e, "another tokenizer")
    with pytest.raises(DataError) as e:
        ShardTokens(str(tmp_path), "train")
    one_line_error(e, "no token shards", "train")
    with open(tmp_path / index["files"][0]["name"], "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError) as e:
        ShardTokens(str(tmp_path), "val")
    one_line_error(e, "truncated")


def test_shards_max_tokens(tmp_path, tok, topics):
    index = write_shards(topics, tok, str(tmp_path), "train", max_tokens=5000)
    assert 5000 <= index["num_tokens"] < 5000 + max(len(tok.encode(t)) + 1 for t in topics)


# ----------------------------------------------------------------------------- datamodule


def make_dm(tmp_path, **kwargs):
    from lrkv.data.datamodule import LMDataModule

    settings = dict(
        source="embedded:topics",
        vocab_size=512,
        seq_len=32,
        batch_size=2,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
        tokenizer_max_chars=200_000,
    )
    settings.update(kwargs)
    return LMDataModule(**settings)


def test_datamodule_batches_and_resume_counting_only_used_batches(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    assert dm.vocab_size == 512 and dm.padded_vocab_size == 512 and dm.eos_id == 0
    train = iter(dm.train_dataloader())
    batches = take(train, 8)  # the eighth is only prefetched: never reaches the model
    for b in batches[:7]:
        dm.on_before_batch_transfer(b, 0)
    assert set(batches[0]) == {"input", "target", "bytes"}
    assert batches[0]["input"].shape == (2, 32)
    state = json.loads(json.dumps(dm.state_dict()))
    resumed = make_dm(tmp_path)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert same_batches(take(iter(resumed.train_dataloader()), 2), batches[7:8] + take(train, 1))
    val = list(dm.val_dataloader())
    assert val and same_batches(val, list(dm.val_dataloader()))


def test_datamodule_hub_sources_need_token_caps(tmp_path):
    hub = "hf:HuggingFaceFW/fineweb-edu"
    with pytest.raises(ConfigError) as e:
        make_dm(tmp_path, source=hub, storage="shards")
    one_line_error(e, "val_max_tokens")
    with pytest.raises(ConfigError) as e:
        make_dm(tmp_path, source=hub, val_max_tokens=10**6)
    one_line_error(e, "max_tokens", "storage=stream or shards")
    make_dm(tmp_path, source=hub, storage="shards", val_max_tokens=10**6)  # constructs offline
    make_dm(tmp_path, source=hub, storage="stream", val_documents=5000)


def test_datamodule_rank_arguments_and_shards(tmp_path):
    rank0 = make_dm(tmp_path, rank=0, world_size=2, storage="shards")
    rank0.prepare_data()
    rank0.setup("fit")
    rank1 = make_dm(tmp_path, rank=1, world_size=2, storage="shards")
    rank1.setup("fit")
    shard_dirs = os.listdir(tmp_path / "cache" / "shards")
    assert len(shard_dirs) == 1  # built once, reused
    a = first_tokens(take(iter(rank0.train_dataloader()), 5))
    b = first_tokens(take(iter(rank1.train_dataloader()), 5))
    assert a != b
    va = first_tokens(list(rank0.val_dataloader()))
    vb = first_tokens(list(rank1.val_dataloader()))
    assert len(va) == len(vb) and va != vb


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_checkpoint_resumes_the_data_exactly(tmp_path, num_workers):
    """Train 10 steps with a checkpoint at step 6; resuming from it trains on steps 7-10's batches."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb, self.seen = torch.nn.Embedding(vocab, 4), []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input"].tolist())
            return self.emb(batch["input"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(model, dm, ckpt_path=None, callbacks=()):
        trainer = L.Trainer(
            max_steps=10,
            accelerator="cpu",
            logger=False,
            callbacks=list(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            val_check_interval=4,
            limit_val_batches=2,
            default_root_dir=str(tmp_path / "out"),
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)

    dm = make_dm(tmp_path, num_workers=num_workers)
    dm.setup("fit")
    full = Tiny(dm.vocab_size)
    every6 = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=6, save_top_k=-1)
    fit(full, dm, callbacks=[every6])
    resumed = Tiny(dm.vocab_size)
    fit(resumed, make_dm(tmp_path, num_workers=num_workers), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=6.ckpt"))
    assert len(full.seen) == 10 and resumed.seen == full.seen[6:]


# ----------------------------------------------------------------------------- dependencies


def test_data_modules_import_nothing_of_the_model_and_no_lightning():
    """lrkv/data imports only lrkv.errors and itself; only datamodule.py imports Lightning."""
    import ast

    import lrkv.data

    folder = os.path.dirname(lrkv.data.__file__)
    checked = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top != "lrkv" or module == "lrkv.errors" or module.startswith("lrkv.data"), (
                    f"{name} imports {module}"
                )
                assert top not in ("lightning", "pytorch_lightning") or name == "datamodule.py", (
                    f"{name} imports {module}"
                )
                checked += 1
    assert checked > 20


# ---- storage=stream: tokenized on the fly ------------------------------------------------------------
def _stream(docs, tok, rank=0, world=1, **kw):
    from lrkv.data.stream import StreamLoader

    return StreamLoader(
        lambda: iter(docs),
        tok,
        seq_len=kw.pop("seq_len", 16),
        batch_size=kw.pop("batch_size", 3),
        seed=kw.pop("seed", 1),
        rank=rank,
        world_size=world,
        block_documents=kw.pop("block_documents", 4),
    )


def test_stream_resumes_exactly_across_blocks_and_epochs():
    import itertools

    docs = embedded_documents("topics")[:4]
    tok = train_bpe(docs, 300)
    loader = _stream(docs, tok, block_documents=1)
    batches = list(itertools.islice(loader.iter_batches(), 400))
    epochs = {b["state"]["epoch"] for b in batches}
    assert len(epochs) >= 2 and len({b["state"]["block"] for b in batches}) >= 3  # crosses blocks and epochs
    for cut in (1, 37, 150, 399):
        state = json.loads(json.dumps(batches[cut - 1]["state"]))  # JSON round trip, as in a checkpoint
        again = list(itertools.islice(_stream(docs, tok, block_documents=1).iter_batches(state), 3))
        for a, b in zip(batches[cut : cut + 3], again):
            assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    first = batches[0]
    assert first["input"].shape == (3, 16) and torch.equal(first["input"][:, 1:], first["target"][:, :-1])
    with pytest.raises(DataError, match="seq_len"):
        list(itertools.islice(_stream(docs, tok, seq_len=32, block_documents=1).iter_batches(state), 1))


def test_stream_ranks_read_their_own_documents():
    docs = embedded_documents("topics")[:8]
    tok = train_bpe(docs, 300)
    for rank in (0, 1):
        mine = "<|endoftext|>".join(d for d in docs[:8][rank::2])
        other = "<|endoftext|>".join(d for d in docs[:8][1 - rank :: 2])
        batch = next(_stream(docs, tok, rank=rank, world=2, block_documents=4, seq_len=64).iter_batches())
        text = tok.decode(batch["input"][0].tolist())
        assert text in mine.replace("<|endoftext|>", "") or text[:40] in mine
        assert text[:40] not in other


def test_val_documents_hold_out_the_head_of_the_stream():
    spec = CorpusSpec(source="embedded:topics", val_documents=5)
    val, train = list(iter_documents(spec, "val")), list(iter_documents(spec, "train"))
    everything = embedded_documents("topics")
    assert val == everything[:5] and train == everything[5:]
    with pytest.raises(ConfigError, match="val_documents"):
        CorpusSpec(source="embedded", val_documents=0)
