"""The lm-eval model "lrkv": scores equal direct computations with the model; offline local tasks.

Task files: tests/data/lm_eval/*.yaml (made-up data, `DATA_DIR` replaced by an absolute path here).
"""

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_evaluate import evaluate

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lrkv.evaluation  # noqa: E402,F401 - registers "lrkv"
from lrkv import LrkvError  # noqa: E402
from lrkv.evaluation.lm_eval_model import LrkvLM  # noqa: E402
from lrkv.io import load_pretrained  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "lm_eval"
TASKS = ["lrkv_tiny_mc", "lrkv_tiny_cloze", "lrkv_tiny_rolling", "lrkv_tiny_gen"]
GEN_STOPS = ["\n", "."]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # lm-eval over trained tiny runs


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- direct computations with the model (no lm-eval code) -----------------------------------------------
@torch.no_grad()
def direct_loglikelihood(model, tok, context, continuation, max_length=None):
    """log p(continuation | EOS + context): one forward, the context's trailing spaces moved to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if context:
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx) :]
    else:
        ctx, cont = [], tok.encode(continuation)
    ids = ([tok.eos_id] + ctx + cont)[-((max_length or model.cfg.max_seq_len) + 1) :]
    logp = F.log_softmax(model(torch.tensor(ids[:-1])[None])[0], dim=-1)[-len(cont) :]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@torch.no_grad()
def direct_rolling(model, tok, text, window):
    """Sum of log p of every token of text; the token at j conditions on the window tokens before it:
    windows of `window` predictions, the last one with a full window of context."""
    toks = tok.encode(text)
    padded = [tok.eos_id] + toks  # padded[j] is the input predicting toks[j]
    total, start = 0.0, 0
    while start < len(toks):
        end = min(start + window, len(toks))
        lo = max(0, end - window)
        logp = F.log_softmax(model(torch.tensor(padded[lo:end])[None])[0], dim=-1)
        targets = torch.tensor(toks[start:end])
        total += logp[start - lo :].gather(-1, targets[:, None]).sum().item()
        start = end
    return total


def greedy_without_cache(model, tok, prompt, max_new, stops):
    ids = [tok.eos_id] + tok.encode(prompt)
    new = model.generate(torch.tensor(ids), max_new, use_cache=False)[len(ids) :].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    text = tok.decode(new)
    for s in stops:
        text = text.split(s)[0]
    return text


# ---- the LM's methods against the direct computations --------------------------------------------------------
def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("lrkv") is LrkvLM


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_direct_sum_of_log_probs(runs, batch_size):
    lm = LrkvLM(checkpoint=str(runs["lrkv"]), batch_size=batch_size, max_length=48)
    model, tok = lm.model, lm.tokenizer
    long_context = "The for statement is used to iterate over the elements of a sequence. " * 8  # > max_length
    pairs = [
        ("Question: Which keyword defines a function?\nAnswer:", " def"),
        ("The while statement ", "is used"),
        ("", "Objects are abstractions for data."),
        (long_context, " It runs the suite once per item"),
        ("A", " b c d e f"),
    ]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        ref, ref_greedy = direct_loglikelihood(model, tok, ctx, cont, max_length=48)
        assert score == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy, (ctx[:20], cont)
        assert score < 0


def test_loglikelihood_rolling_equals_direct(runs):
    lm = LrkvLM(checkpoint=str(runs["mha"]), batch_size=2, max_length=32)
    docs = [d["page"] for d in jsonl(DATA / "tiny_rolling.jsonl")]
    assert len(lm.tok_encode(docs[2])) > 3 * 32  # several windows, with a partial last one
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(d,)) for d in docs])
    for doc, score in zip(docs, got):
        assert score == pytest.approx(direct_rolling(lm.model, lm.tokenizer, doc, 32), abs=1e-3)


def test_generate_until_with_cache_equals_greedy_without_cache(runs):
    lm = LrkvLM(checkpoint=str(runs["lrkv"]), batch_size=2)
    reqs = [
        ("The for statement", {"until": ["."], "max_gen_toks": 20}),
        ("The if statement", {"until": ["."], "max_gen_toks": 20}),  # as many tokens as the first: one batch
        ("The with statement", {"until": ["."], "max_gen_toks": 20}),  # (batch_size=2: the next batch)
        ("A", {"until": ["\n"], "max_gen_toks": 15}),
        ("Objects are abstractions", {"until": ["zzz"], "max_gen_toks": 10, "do_sample": False}),
        ("The", {"max_gen_toks": 12}),
    ]
    lengths = [len(lm.tok_encode(r[0])) for r in reqs[:3]]
    assert lengths[0] == lengths[1] == lengths[2]
    got = lm.generate_until([SimpleNamespace(args=r) for r in reqs])
    for (prompt, kw), text in zip(reqs, got):
        ref = greedy_without_cache(lm.model, lm.tokenizer, prompt, kw["max_gen_toks"], kw.get("until", []))
        assert text == ref, (prompt, text, ref)
    assert any(got)


# ---- through lm_eval.simple_evaluate with local task files ---------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(runs, tmp_path_factory):
    """Task YAMLs with absolute data paths; the generation task's answers are the model's own greedy outputs
    for prompts 0, 2, 4 and wrong for 1, 3 (so exact_match must be 0.6)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    p = load_pretrained(runs["lrkv"])
    docs = jsonl(DATA / "tiny_gen.jsonl")
    for i, doc in enumerate(docs):
        doc["answer"] = (
            greedy_without_cache(p.model, p.tokenizer, doc["prompt"], 12, GEN_STOPS) if i % 2 == 0 else "no."
        )
    (folder / "tiny_gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for yaml_file in DATA.glob("*.yaml"):
        data_dir = folder if yaml_file.stem == "tiny_gen" else DATA
        (folder / yaml_file.name).write_text(yaml_file.read_text().replace("DATA_DIR", str(data_dir)))
    return folder


@pytest.fixture(scope="module")
def harness_results(runs, task_dir):
    return lm_eval.simple_evaluate(
        model="lrkv",
        model_args=f"checkpoint={runs['lrkv']},batch_size=4",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )


def test_multiple_choice_accuracy_equals_hand_computation(runs, harness_results):
    p = load_pretrained(runs["lrkv"])
    acc, acc_norm, docs = 0, 0, jsonl(DATA / "tiny_mc.jsonl")
    for doc in docs:
        lls = [
            direct_loglikelihood(p.model, p.tokenizer, f"Question: {doc['question']}\nAnswer:", " " + c)[0]
            for c in doc["choices"]
        ]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    res = harness_results["results"]["lrkv_tiny_mc"]
    assert res["acc,none"] == pytest.approx(acc / len(docs))
    assert res["acc_norm,none"] == pytest.approx(acc_norm / len(docs))


def test_cloze_perplexity_and_accuracy_equal_hand_computation(runs, harness_results):
    p = load_pretrained(runs["lrkv"])
    lls, greedy = [], []
    for doc in jsonl(DATA / "tiny_cloze.jsonl"):
        words = doc["text"].split(" ")
        ll, g = direct_loglikelihood(p.model, p.tokenizer, " ".join(words[:-1]), " " + words[-1])
        lls.append(ll)
        greedy.append(g)
    res = harness_results["results"]["lrkv_tiny_cloze"]
    assert res["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert res["acc,none"] == pytest.approx(sum(greedy) / len(greedy))


def test_rolling_perplexities_equal_hand_computation(runs, harness_results):
    p = load_pretrained(runs["lrkv"])
    docs = [d["page"] for d in jsonl(DATA / "tiny_rolling.jsonl")]
    lls = [direct_rolling(p.model, p.tokenizer, d, p.model.cfg.max_seq_len) for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    res = harness_results["results"]["lrkv_tiny_rolling"]
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-4)
    assert res["bits_per_byte,none"] == pytest.approx(-sum(lls) / (nbytes * math.log(2)), rel=1e-4)


def test_generation_exact_match_equals_hand_computation(harness_results):
    assert harness_results["results"]["lrkv_tiny_gen"]["exact_match,none"] == pytest.approx(0.6)


def test_lm_eval_mode_through_hydra(runs, task_dir, harness_results, tmp_path):
    out = evaluate(
        tmp_path,
        f"ckpt={runs['lrkv']}",
        f"lm_eval.tasks=[{','.join(TASKS)}]",  # tasks select lm_eval
        f"lm_eval.include_path={task_dir}",
        "lm_eval.include_defaults=false",
        "batch_size=auto",  # the largest that fits: scores must not depend on it
        "lm_eval.max_batch_size=16",
    )
    assert out["mode"] == "lm_eval"
    scores = json.loads((tmp_path / "lm_eval_scores.json").read_text())
    for task in TASKS:
        for metric, value in scores[task].items():
            assert value == pytest.approx(harness_results["results"][task][metric], rel=1e-5), (task, metric)
    info = json.loads((tmp_path / "lm_eval_results.json").read_text())["lrkv"]
    assert info["checkpoint"].endswith("pretrained")
    assert info["batch_size_requested"] == "auto" and 1 <= info["batch_size"] <= 16
    assert "lrkv_tiny_mc" in out["text"] and "acc" in out["text"]
    assert (tmp_path / "lm_eval_table.md").is_file()


def test_unknown_task_and_bad_include_path(runs, task_dir, tmp_path):
    with pytest.raises(LrkvError, match="unknown lm-eval task 'lrkv_tiny_mcq'; did you mean lrkv_tiny_mc"):
        evaluate(
            tmp_path,
            "mode=lm_eval",
            f"ckpt={runs['lrkv']}",
            "lm_eval.tasks=[lrkv_tiny_mcq]",
            f"lm_eval.include_path={task_dir}",
            "lm_eval.include_defaults=false",
        )
    with pytest.raises(LrkvError, match="is not a folder"):
        evaluate(
            tmp_path,
            "mode=lm_eval",
            f"ckpt={runs['lrkv']}",
            "lm_eval.tasks=[x]",
            f"lm_eval.include_path={tmp_path / 'none'}",
        )
    with pytest.raises(LrkvError, match="needs a checkpoint"):
        evaluate(tmp_path, "mode=lm_eval", f"lm_eval.include_path={task_dir}", "lm_eval.include_defaults=false")


def test_a_suite_expands_to_its_tasks_with_the_same_scores(runs, task_dir, harness_results, tmp_path, monkeypatch):
    """lm_eval.tasks=[SUITE] runs the suite's tasks (here a local stand-in for [paper]) with the same scores."""
    from lrkv.evaluation import suites

    monkeypatch.setitem(suites.SUITES, "tiny", list(TASKS))
    out = evaluate(
        tmp_path,
        f"ckpt={runs['lrkv']}",
        "lm_eval.tasks=[tiny]",
        f"lm_eval.include_path={task_dir}",
        "lm_eval.include_defaults=false",
        "batch_size=2",
    )
    scores = json.loads((tmp_path / "lm_eval_scores.json").read_text())
    assert sorted(scores) == sorted(TASKS)
    for task in TASKS:
        for metric, value in scores[task].items():
            assert value == pytest.approx(harness_results["results"][task][metric], rel=1e-5), (task, metric)
    assert out["mode"] == "lm_eval"
