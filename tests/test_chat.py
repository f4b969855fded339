"""Chat mid-training (lrkv/data/chat.py): template, assistant-only mask, packing, masked loss, vocabulary growth."""

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_model
from train_helpers import evaluate

from lrkv.data.chat import (
    ASSISTANT_END,
    CHAT_TOKENS,
    add_chat_tokens,
    chat_ids,
    chat_tokens,
    gsm8k_messages,
    mmlu_messages,
    prompt_ids,
    render,
)
from lrkv.data.corpus import embedded_documents
from lrkv.data.loader import BatchLoader
from lrkv.data.tokenizer import Tokenizer, train_bpe
from lrkv.errors import CheckpointError, LrkvError
from lrkv.training.init_from import check_compatible, grow_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a list in Python?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple? Say <|assistant_end|> please."},
    {"role": "assistant", "content": "An immutable one: <|user_start|> is just text here."},
]


@functools.lru_cache(maxsize=1)
def _base_json() -> str:
    return train_bpe(embedded_documents("topics")[:150], 300).backend.to_str()


def base_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_str(_base_json()))


def chat_tokenizer() -> Tokenizer:
    return add_chat_tokens(base_tokenizer())


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Learnable synthetic conversations: sums of small numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            }
        )
    return rows


def test_chat_tokens_are_single_new_ids_that_text_never_produces(tmp_path):
    base = base_tokenizer()
    tok = add_chat_tokens(base_tokenizer())
    ids = chat_ids(tok)
    assert sorted(ids.values()) == list(range(base.vocab_size, base.vocab_size + len(CHAT_TOKENS)))
    assert tok.vocab_size == base.vocab_size + len(CHAT_TOKENS)
    for token, i in ids.items():
        assert tok.decode([i]) == token
        assert i not in tok.encode(f"a {token} b")  # the literal string in text stays ordinary tokens
    assert tok.encode("plain text") == base.encode("plain text")  # old ids keep their meaning
    assert add_chat_tokens(tok).vocab_size == tok.vocab_size  # idempotent
    reloaded = Tokenizer.load(tok.save(str(tmp_path)))
    assert chat_ids(reloaded) == ids


def test_mask_covers_exactly_the_assistant_turns_and_their_end_token():
    tok = chat_tokenizer()
    ids, mask = render(CONVERSATION, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [a + ASSISTANT_END for a in assistant]
    text = tok.decode(ids)
    assert text.startswith("<|user_start|>You are terse.\n\nWhat is a list")  # system merged into the first user turn
    assert text.count("<|assistant_start|>") == 2 and text.endswith("is just text here.<|assistant_end|>")
    end = chat_ids(tok)[ASSISTANT_END]
    assert [i for i, m in zip(ids, mask) if i == end and m] == [end, end]  # the real end tokens are targets


def test_mmlu_and_gsm8k_adapters():
    row = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}
    user, assistant = mmlu_messages(row)
    assert "A. 3\nB. 4\nC. 5\nD. 6" in user["content"] and assistant == {"role": "assistant", "content": "B"}
    assert mmlu_messages({"train": row}) == mmlu_messages(row)  # cais/mmlu auxiliary_train's nesting
    assert mmlu_messages({**row, "answer": "C"})[1]["content"] == "C"
    gsm = gsm8k_messages({"question": "Q?", "answer": "work\n#### 4"})
    assert [m["role"] for m in gsm] == ["user", "assistant"] and gsm[1]["content"] == "work\n#### 4"


def test_packing_carries_the_mask_into_targets():
    tok = chat_tokenizer()
    rows = conversations(12)
    stream, targets = [], []
    for row in rows:
        ids, mask = render(row["messages"], tok)
        stream += ids + [tok.eos_id]
        targets += [i if m else -1 for i, m in zip(ids, mask)] + [-1]  # the separator is not a target
    source = chat_tokens(rows, tok)
    seq = 16
    loader = BatchLoader(source, seq_len=seq, batch_size=2, shuffle=False, infinite=False)
    seen = 0
    for batch in loader:
        for r in range(len(batch["input"])):
            w = seen + r
            assert batch["input"][r].tolist() == stream[w * seq : (w + 1) * seq]
            assert batch["target"][r].tolist() == targets[w * seq + 1 : (w + 1) * seq + 1]
        seen += len(batch["input"])
    assert seen == (len(stream) - 1) // seq and (torch.tensor(targets) >= 0).any()


def test_loss_counts_assistant_tokens_only():
    model = random_model("mha")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (2, 10), generator=g)
    y = torch.randint(0, 97, (2, 10), generator=g)
    keep = torch.rand(2, 10, generator=g) < 0.4
    keep[0, 0] = True
    targets = torch.where(keep, y, torch.full_like(y, -1))
    with torch.no_grad():
        loss = model.loss(x, targets)
        logp = F.log_softmax(model(x).float(), -1)
    hand = -sum(logp[b, t, y[b, t]] for b in range(2) for t in range(10) if keep[b, t]) / int(keep.sum())
    assert math.isclose(float(loss), float(hand), rel_tol=1e-5)
    unmasked = model.loss(x, y).item()
    assert not math.isclose(float(loss), unmasked, rel_tol=1e-3)  # the masked tokens really are left out


def test_embedding_growth_keeps_old_rows_and_old_logits():
    source = random_model("mha", vocab_size=97)
    grown_model = random_model("mha", vocab_size=128, seed=3)
    state = grow_vocab(source.state_dict(), 128, known=90)  # ids 90..127: new tokens and padding
    for key in ("embed.weight", "lm_head.weight"):
        old, new = source.state_dict()[key], state[key]
        assert new.shape[0] == 128 and torch.equal(new[:90], old[:90])
        assert torch.allclose(new[90:], old[:90].mean(0).expand(38, -1))
    grown_model.load_state_dict(state)
    x = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(grown_model(x)[..., :90], source(x)[..., :90], atol=1e-5, rtol=0)
    check_compatible(source.cfg, grown_model.cfg, "src")  # a larger vocabulary is allowed (growth)
    with pytest.raises(CheckpointError, match="vocab_size 128, this run 97"):
        check_compatible(grown_model.cfg, source.cfg, "src")


def test_chat_data_needs_a_given_tokenizer(tmp_path):
    from lrkv.data.datamodule import LMDataModule

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversations(4)))
    with pytest.raises(LrkvError, match="needs the pretrained model's tokenizer: set train.init_from") as err:
        LMDataModule(str(path), format="chat").load_tokenizer()
    assert "\n" not in str(err.value)
    with pytest.raises(LrkvError, match="format='chatml' is unknown"):
        LMDataModule(str(path), format="chatml")


@pytest.mark.slow
def test_midtrain_tiny_trains_from_a_pretrained_run_and_its_loss_falls(runs, tmp_path):
    from train_helpers import tiny_overrides, train_in_process, train_losses

    from lrkv.io import load_pretrained

    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversations(400)))
    fields = {
        "experiment": "midtrain_tiny",
        "train.init_from": str(runs["mha"]),
        "data.source": str(path),
        "data.val_batches": 2,
        "optim.warmup_steps": 0,
        "train.val_every": 0,
        "train.ckpt_every": 30,
    }
    overrides = tiny_overrides(tmp_path / "out", tmp_path / "cache", model="mha_tiny", steps=30, **fields)
    summary = train_in_process(overrides, tmp_path / "run")
    losses = train_losses(tmp_path / "run")
    assert summary["steps"] == 30 and math.isfinite(summary["final_val_loss"])
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.5 * first, losses
    trained = load_pretrained(str(tmp_path / "run"))
    assert chat_ids(trained.tokenizer)[ASSISTANT_END] == 515  # the run's tokenizer holds the chat tokens
    assert trained.model.cfg.vocab_size == 640  # 516 ids padded to a multiple of 128

    # mode=generate chat=true: the prompt in the template, greedy, stops at <|assistant_end|>
    out = evaluate(
        tmp_path / "gen",
        "mode=generate",
        f"ckpt={tmp_path / 'run'}",
        "chat=true",
        "prompt=What is 3 plus 4?",
        "temperature=0",
        "max_new_tokens=20",
    )
    tok, model = trained.tokenizer, trained.model
    ids = [tok.eos_id] + prompt_ids("What is 3 plus 4?", tok)
    assert tok.decode(ids[1:]) == "<|user_start|>What is 3 plus 4?<|user_end|><|assistant_start|>"
    end = chat_ids(tok)[ASSISTANT_END]
    ref = model.generate(torch.tensor(ids), 20, use_cache=False)[len(ids) :].tolist()
    ref = ref[: ref.index(end)] if end in ref else ref
    (sample,) = out["result"]["samples"]
    assert sample["completions"] == [tok.decode(ref)] and sample["prompt_tokens"] == len(ids)
    print("chat completion:", sample["completions"])
    # evaluate.py's held-out loss of a chat run scores the assistant tokens, as the run's validation did
    scored = evaluate(tmp_path / "loss", f"ckpt={tmp_path / 'run'}")
    assert scored["mode"] == "loss" and math.isclose(scored["result"]["loss"], summary["final_val_loss"], rel_tol=1e-4)


def test_chat_generation_needs_a_chat_model(runs, tmp_path):
    with pytest.raises(LrkvError, match="generate.chat=true needs a chat model") as err:
        evaluate(tmp_path, "mode=generate", f"ckpt={runs['mha']}", "chat=true", "prompt=Hi", "max_new_tokens=4")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("storage", ["memory", "shards"])
def test_a_mixture_takes_chat_sources_with_their_masks(tmp_path, storage):
    from lrkv.data.datamodule import LMDataModule

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversations(300)))
    tok_path = base_tokenizer().save(str(tmp_path))
    sources = [
        {"name": "chat", "source": str(path), "weight": 0.5, "format": "chat"},
        {"name": "text", "source": "embedded:topics", "weight": 0.5},
    ]
    dm = LMDataModule(
        "mixture",
        sources=sources,
        tokenizer=tok_path,
        seq_len=32,
        batch_size=8,
        rank=0,
        world_size=1,
        storage=storage,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    assert len(list((tmp_path / "cache").glob("shards/*/val.json"))) == (2 if storage == "shards" else 0)
    dm.setup()
    assert dm.tokenizer.vocab_size == 304  # 300 + the chat tokens
    batch = next(iter(dm.train_dataloader()))
    masked = (batch["target"] == -1).any(1)
    assert masked.any() and not masked.all()  # chat rows carry masks, text rows do not
    assert (batch["input"] >= 0).all() and int(batch["input"].max()) < 304
    with pytest.raises(LrkvError, match="needs the pretrained model's tokenizer"):
        LMDataModule("mixture", sources=sources, seq_len=32).load_tokenizer()


def test_chat_data_resumes_exactly(tmp_path):
    from lrkv.data.datamodule import LMDataModule

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversations(200)))
    tok_path = base_tokenizer().save(str(tmp_path))

    def module():
        dm = LMDataModule(str(path), format="chat", tokenizer=tok_path, seq_len=16, batch_size=4, rank=0, world_size=1)
        dm.setup()
        return dm

    first = module()
    batches = []
    for batch in first.train_dataloader():
        first.on_before_batch_transfer(batch, 0)
        batches.append(batch)
        if len(batches) == 5:
            break
    state = first.state_dict()
    second = module()
    second.load_state_dict(state)
    resumed = next(iter(second.train_dataloader()))
    reference = [b for _, b in zip(range(6), module().train_dataloader())][5]
    assert all(torch.equal(resumed[k], reference[k]) for k in ("input", "target"))
    assert (reference["target"] == -1).any() and (reference["target"] >= 0).any()


def test_chat_shards_keep_the_masks_and_match_memory(tmp_path):
    """data=chat with storage=shards: written once as int32 with the ~id marks; validation windows equal the
    in-memory ones (targets and masks), training resumes exactly, and streaming conversations is refused."""
    from lrkv.data.datamodule import LMDataModule

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversations(200)))
    tok_path = base_tokenizer().save(str(tmp_path))

    def module(storage):
        dm = LMDataModule(
            str(path),
            format="chat",
            tokenizer=tok_path,
            seq_len=16,
            batch_size=4,
            rank=0,
            world_size=1,
            storage=storage,
            cache_dir=str(tmp_path / "cache"),
        )
        dm.prepare_data()
        dm.setup()
        return dm

    shards, memory = module("shards"), module("memory")
    (index,) = (tmp_path / "cache").glob("shards/*/train.json")
    assert json.loads(index.read_text())["dtype"] == np.dtype(np.int32).str
    val_s, val_m = list(shards.val_dataloader()), list(memory.val_dataloader())
    assert len(val_s) == len(val_m) > 0
    for a, b in zip(val_s, val_m):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert any((b["target"] == -1).any() for b in val_s) and any((b["target"] >= 0).any() for b in val_s)
    reference = [b for _, b in zip(range(6), module("shards").train_dataloader())]
    first = module("shards")
    for _, batch in zip(range(3), first.train_dataloader()):
        first.on_before_batch_transfer(batch, 0)
    resumed = module("shards")
    resumed.load_state_dict(first.state_dict())
    batch = next(iter(resumed.train_dataloader()))
    assert all(torch.equal(batch[k], reference[3][k]) for k in ("input", "target"))
    with pytest.raises(LrkvError, match="memory or shards, not stream"):
        LMDataModule(str(path), format="chat", storage="stream")


def test_a_batch_without_assistant_tokens_has_zero_loss_not_nan():
    """A packed chat window can hold no assistant token: its loss is 0 with zero gradients (no NaN guard stop)."""
    from helpers import tiny_config

    from lrkv import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("mha"))
    x = torch.randint(0, model.cfg.vocab_size, (2, 8))
    masked = torch.full_like(x, -1)
    loss = model.loss(x, masked)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    targets = torch.randint(0, model.cfg.vocab_size, (2, 8))
    targets[0, :5] = -1
    ref = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(model.loss(x, targets), ref)


def test_the_paper_mix_reads_through_the_hub_reader_into_shards(tmp_path, monkeypatch):
    """experiment=midtrain_128m's three sources with their formats and validation settings, each pointed at a
    local stand-in through the hub reader ('hf:<dir>' runs datasets.load_dataset(streaming=True)), on shards:
    every source yields masked windows and its own validation, and a second setup reuses the shards."""
    from test_configs import compose_train, resolve

    from lrkv.data.datamodule import LMDataModule

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    chat = conversations(120)
    mmlu = [{"question": f"{a} + 1 = ?", "choices": [str(a), str(a + 1)], "answer": 1} for a in range(60)]
    rows = {
        "smoltalk": {"train": chat[:100], "test": chat[100:]},
        "mmlu": {"train": mmlu},
        "gsm8k": {
            "train": [{"question": f"Tom has {a} apples.", "answer": f"He has {a}. #### {a}"} for a in range(40)],
            "test": [{"question": f"Ann has {a} pears.", "answer": f"#### {a}"} for a in range(10)],
        },
    }
    for name, splits in rows.items():
        (tmp_path / name).mkdir()
        for split, items in splits.items():
            (tmp_path / name / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in items))
    cfg = resolve(compose_train(["experiment=midtrain_128m"]))["data"]
    assert cfg["storage"] == "shards"
    sources = []
    for spec in cfg["sources"]:
        local = {k: v for k, v in spec.items() if k not in ("config", "max_tokens", "val_max_tokens")}
        sources.append({**local, "source": f"hf:{tmp_path / spec['name']}"})
    assert sources[1]["name"] == "mmlu" and sources[1]["val_documents"] == 2000
    sources[1]["val_documents"] = 10  # the stand-in has 60 questions
    tok_path = base_tokenizer().save(str(tmp_path))

    def module():
        dm = LMDataModule(
            "mixture",
            sources=sources,
            tokenizer=tok_path,
            seq_len=16,
            batch_size=8,
            val_batches=2,
            rank=0,
            world_size=1,
            storage=cfg["storage"],
            cache_dir=str(tmp_path / "cache"),
        )
        dm.prepare_data()
        dm.setup()
        return dm

    dm = module()
    assert len(list((tmp_path / "cache").glob("shards/*/train.json"))) == 3
    drawn = torch.cat([b["source"] for _, b in zip(range(20), dm.train_dataloader())])
    assert set(drawn.tolist()) <= {0, 1, 2} and int((drawn == 0).sum()) > int((drawn == 2).sum())
    val = list(dm.val_dataloader())
    assert sorted({int(b["source"][0]) for b in val}) == [0, 1, 2]  # each source validated on its own
    assert all((b["target"] == -1).any() and (b["target"] >= 0).any() for b in val)
    monkeypatch.setattr("lrkv.data.shards.write_documents", lambda *a, **k: pytest.fail("shards written again"))
    again = module()
    first = next(iter(again.train_dataloader()))
    assert torch.equal(first["input"], next(iter(dm.train_dataloader()))["input"])
