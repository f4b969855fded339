"""evaluate.py and lrkv.evaluation: every mode through the Hydra entry, checked against direct computations.

lm-eval tests live in tests/test_evaluate_lm_eval.py; the tiny trained runs in tests/evaluate_fixtures.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evaluate_fixtures import DATA_CFG, corpus_spec, runs  # noqa: F401 - runs is a fixture
from helpers import random_model, randomize, tiny_config
from hydra import compose, initialize_config_dir

from lrkv import ConfigError, LrkvError, Transformer, load_model_config
from lrkv.attention import get_attention_class
from lrkv.data import iter_documents
from lrkv.evaluation.compare import compare_runs, pareto_front, steps_to_target
from lrkv.evaluation.diversity import effective_rank, gram_matrix, head_diversity, head_maps
from lrkv.evaluation.footprint import footprint_table
from lrkv.evaluation.modes import run
from lrkv.evaluation.sample import decode
from lrkv.io import load_pretrained

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def evaluate(out_dir, *overrides):
    """Compose configs/evaluate.yaml with overrides (as on the command line) and run the mode in-process."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    return run(cfg, out_dir, echo=False)


# ---- loss and bits-per-byte ---------------------------------------------------------------------
def direct_heldout(model, tokenizer, seq_len, max_tokens):
    """Validation loss and bpb computed from scratch: documents -> ids + EOS -> windows -> summed CE;
    bytes = UTF-8 length of the decoded text the targets cover."""
    stream, total = [], 0
    for text in iter_documents(corpus_spec(), "val"):
        ids = tokenizer.encode(text)
        stream += ids + [tokenizer.eos_id]
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    windows = (len(stream) - 1) // seq_len
    nats = 0.0
    with torch.no_grad():
        for w in range(windows):
            chunk = torch.tensor(stream[w * seq_len : w * seq_len + seq_len + 1])[None]
            nats += model.loss(chunk[:, :-1], chunk[:, 1:], reduction="sum").double().item()
    targets = stream[1 : windows * seq_len + 1]
    text = tokenizer.decode([t for t in targets if t != tokenizer.eos_id])
    nbytes = len(text.encode("utf-8"))
    n = windows * seq_len
    return nats / n, nats / (math.log(2) * nbytes), n, nbytes


def test_loss_mode_matches_direct_computation(runs, tmp_path):
    out = evaluate(tmp_path, f"ckpt={runs['lrkv']}")
    assert out["mode"] == "loss"  # the default with a checkpoint
    r = out["result"]
    p = load_pretrained(runs["lrkv"])
    loss, bpb, n, nbytes = direct_heldout(p.model, p.tokenizer, DATA_CFG["seq_len"], DATA_CFG["val_max_tokens"])
    assert r["tokens"] == n and r["seq_len"] == DATA_CFG["seq_len"]
    assert abs(r["bytes"] - nbytes) <= 3  # decoding may differ by one partial UTF-8 character at the end
    assert r["loss"] == pytest.approx(loss, rel=1e-6)
    assert r["bpb"] == pytest.approx(bpb, rel=1e-4)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert r["bpb"] == pytest.approx(r["nats"] / (math.log(2) * r["bytes"]), rel=1e-12)
    # the run's own logged validation loss is reproduced from its data config
    summary = json.loads((runs["lrkv"] / "summary.json").read_text())
    assert r["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert r["bpb"] == pytest.approx(summary["final_val_bpb"], rel=1e-6)
    assert json.loads((tmp_path / "loss.json").read_text())["bpb"] == pytest.approx(r["bpb"])
    assert r["logged_final_val_loss"] == summary["final_val_loss"] and "(same data)" in out["text"]


def test_loss_on_other_data_and_split(runs, tmp_path):
    pre = evaluate(
        tmp_path / "a", f"ckpt={runs['mha']}/pretrained", "loss.max_batches=2", "batch_size=4", "loss.seq_len=32"
    )
    assert pre["result"]["tokens"] == 2 * 4 * 32 and pre["result"]["batches"] == 2
    train = evaluate(tmp_path / "b", f"ckpt={runs['mha']}", "loss.split=train", "loss.max_batches=3")
    assert train["result"]["split"] == "train" and train["result"]["batches"] == 3
    # any data config: a local text file instead of the run's corpus
    text = tmp_path / "notes.txt"
    text.write_text("The for statement iterates over a sequence. " * 40)
    other = evaluate(
        tmp_path / "c",
        f"ckpt={runs['mha']}",
        "data=local",
        f"data.source={text}",
        "data.val_fraction=0",
        "loss.split=train",
    )  # configs/data/local.yaml's ${model.max_seq_len} is left to the run's value
    assert other["result"]["source"] == str(text) and other["result"]["seq_len"] == DATA_CFG["seq_len"]
    assert other["result"]["bpb"] > 0 and "logged_final_val_loss" not in other["result"]
    with pytest.raises(ConfigError, match="data.source must be set"):
        evaluate(tmp_path / "d", f"ckpt={runs['mha']}", "data=local")


# ---- footprint -------------------------------------------------------------------------------------
PRESETS_1B = ["mha_1b", "gqa_1b", "mqa_1b", "mla_1b", "lrkv_1b"]


def test_footprint_mode_matches_analytic(tmp_path):
    out = evaluate(
        tmp_path, "mode=footprint", f"models=[{','.join(PRESETS_1B)},lrkv_tiny]", "context=2048", "batch_size=2"
    )
    rows = {r["model"]: r for r in out["result"]}
    mha = load_model_config("mha_1b")
    for name in PRESETS_1B:
        cfg = load_model_config(name)
        r = rows[name]
        assert r["kv_bytes_per_token"] == cfg.kv_cache_bytes_per_token(torch.bfloat16)
        assert r["kv_mib"] == pytest.approx(r["kv_bytes_per_token"] * 2048 * 2 / 2**20)
        assert r["ratio_to_mha"] == pytest.approx(r["kv_bytes_per_token"] / mha.kv_cache_bytes_per_token())
    lrkv = load_model_config("lrkv_1b")
    assert rows["lrkv_1b"]["ratio_to_mha"] == pytest.approx(1 / lrkv.n_head + lrkv.rank / lrkv.head_dim)
    assert rows["mha_1b"]["ratio_to_mha"] == 1.0
    assert rows["mha_1b"]["params"] > 1.2e9
    assert (tmp_path / "footprint.csv").read_text().count("\n") == 7
    assert "| lrkv_1b | lrkv |" in (tmp_path / "footprint.md").read_text()
    assert "KV MiB" in out["text"]


def test_footprint_measures_the_real_cache(monkeypatch):
    cls = get_attention_class("lrkv")
    monkeypatch.setattr(cls, "cache_elements_per_token", classmethod(lambda c, cfg: 2 * cfg.head_dim))
    with pytest.raises(AssertionError, match="measured KV cache"):
        footprint_table(["lrkv_tiny"], context=64)


# ---- compare ---------------------------------------------------------------------------------------
def write_fake_run(folder: Path, name, attention, kv, val_losses, steps=(100, 200, 300, 400)):
    folder.mkdir(parents=True)
    lines = ["step,tokens,train_loss,val_loss,val_bpb,lr,grad_norm,tokens_per_s,mfu,peak_mem_gib"]
    for s, v in zip(steps, val_losses):
        lines.append(f"{s - 50},{(s - 50) * 1000},{v + 0.2},,,0.01,1.0,1000,,")
        lines.append(f"{s},{s * 1000},{v + 0.1},{v},{v / 2},0.01,1.0,1000,,")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {
        "name": name,
        "model": name,
        "attention": attention,
        "params": 1000,
        "non_embedding_params": 900,
        "kv_bytes_per_token": kv,
        "steps": steps[-1],
        "tokens": steps[-1] * 1000,
        "final_train_loss": val_losses[-1] + 0.1,
        "final_val_loss": val_losses[-1],
        "final_val_bpb": val_losses[-1] / 2,
        "tokens_per_s": 1000.0,
        "wall_time_s": 1.0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_steps_to_target_on_known_curves(tmp_path):
    a = write_fake_run(tmp_path / "a", "gqa", "gqa", 100, [4.2, 3.6, 3.3, 3.1])
    b = write_fake_run(tmp_path / "b", "mha", "mha", 400, [4.0, 3.5, 3.2, 3.0])
    c = write_fake_run(tmp_path / "c", "lrkv", "lrkv", 200, [3.9, 3.3, 3.0, 2.9])
    result = compare_runs([a, b, c])
    assert result["baseline"] == "mha" and result["target"] == 3.0  # the MHA run, wherever it is listed
    got = {r["name"]: (r["steps_to_target"], r["tokens_to_target"], r["vs_baseline"]) for r in result["runs"]}
    assert got == {"mha": (400, 400_000, 1.0), "lrkv": (300, 300_000, 0.75), "gqa": (None, None, None)}
    explicit = compare_runs([a, b, c], target=3.35, baseline="gqa")
    assert {r["name"]: r["steps_to_target"] for r in explicit["runs"]} == {"gqa": 300, "mha": 300, "lrkv": 200}
    train = compare_runs([a, b, c], metric="train_loss", target=3.5)  # train rows are every 50 steps
    assert {r["name"]: r["steps_to_target"] for r in train["runs"]}["lrkv"] == 150
    assert steps_to_target({"step": [1, 2], "val_loss": [None, 2.0]}, 2.5) == (2, None)
    assert pareto_front([(100, 3.1), (400, 3.0), (200, 2.9), (300, 2.95)]) == [0, 2]


def test_compare_mode_writes_table_and_plots(runs, tmp_path):
    multirun = runs["mha"].parent
    out = evaluate(tmp_path, "mode=compare", f"runs=[{multirun}]")
    result = out["result"]
    names = [r["name"] for r in result["runs"]]
    assert names == ["mha-tiny", "lrkv-tiny"]
    mha_summary = json.loads((runs["mha"] / "summary.json").read_text())
    assert result["target"] == mha_summary["final_val_loss"] and result["baseline"] == "mha-tiny"
    mha = result["runs"][0]
    assert mha["steps_to_target"] == 160 and mha["kv_bytes_per_token"] == 512
    for f in ("compare.md", "compare.csv", "compare.json", "loss_vs_steps.png", "loss_vs_tokens.png", "pareto_kv.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert (tmp_path / "loss_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "compare.md").read_text()
    assert f"target val_loss = {result['target']:.4f}" in md and "| lrkv-tiny |" in md
    # a list of run folders gives the same runs (runs without a checkpoint select mode compare)
    listed = evaluate(tmp_path / "list", f"runs=[{runs['lrkv']},{runs['mha']}]", "compare.target=4.0")
    assert listed["mode"] == "compare"
    assert [r["steps_to_target"] for r in listed["result"]["runs"]] == [120, 120]


# ---- head diversity ----------------------------------------------------------------------------------
@torch.no_grad()
def test_identical_heads_have_effective_rank_one():
    model = random_model("mha")
    h, dh = model.cfg.n_head, model.cfg.head_dim
    for block in model.blocks:
        for w in (block.attn.wq.weight, block.attn.wk.weight):
            w.copy_(w[:dh].repeat(h, 1))
    rows = head_diversity(model)
    for r in rows:
        assert r["effective_rank"] == pytest.approx(1.0, abs=1e-6)
        assert r["percent_of_heads"] == pytest.approx(100.0 / h, abs=1e-4)


@torch.no_grad()
def test_lrkv_with_shared_keys_only_and_equal_queries_is_rank_one():
    model = random_model("lrkv")
    dh = model.cfg.head_dim
    for block in model.blocks:
        block.attn.bk.zero_()  # no residual: every head keys through W_shared
        block.attn.wq.weight.copy_(block.attn.wq.weight[:dh].repeat(model.cfg.n_head, 1))
    assert all(r["percent_of_heads"] == pytest.approx(25.0, abs=1e-4) for r in head_diversity(model))


def test_random_heads_are_diverse():
    torch.manual_seed(0)
    cfg = tiny_config("mha", n_head=8, d_model=128, head_dim=32)
    rows = head_diversity(randomize(Transformer(cfg)))
    assert all(r["percent_of_heads"] > 95 for r in rows)
    for kind in ("gqa", "lrkv", "mla"):
        rows = head_diversity(random_model(kind))
        assert all(50 < r["percent_of_heads"] <= 100 + 1e-9 for r in rows), (kind, rows)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa", "lrkv"])
@torch.no_grad()
def test_head_maps_are_the_models_projections(kind):
    model = random_model(kind)
    attn = model.blocks[1].attn
    x = torch.randn(1, 5, model.cfg.d_model)
    wq, wk = head_maps(attn)
    b, t, h, dh = 1, 5, model.cfg.n_head, model.cfg.head_dim
    q = attn.wq(x).view(b, t, h, dh)
    k = (
        attn.keys_values(x)[0]
        if kind == "lrkv"
        else attn.wk(x).view(b, t, -1, dh).repeat_interleave(h // attn.kv_heads, dim=2)
    )
    torch.testing.assert_close(torch.einsum("btd,hde->bthe", x.double(), wq), q.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.einsum("btd,hde->bthe", x.double(), wk), k.double(), atol=1e-5, rtol=0)
    # the Gram matrix equals the one of explicitly materialised d x d maps
    a = torch.einsum("hda,hea->hde", wq, wk).flatten(1)
    torch.testing.assert_close(gram_matrix(wq, wk), a @ a.T)


def test_effective_rank_formula():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.diag(torch.tensor([1.0, 0, 0]))) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(torch.diag(p * 7)) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_diversity_mode(runs, tmp_path):
    out = evaluate(tmp_path, "mode=diversity", f"ckpt={runs['lrkv']}")
    (res,) = out["result"].values()
    assert res["attention"] == "lrkv" and len(res["rows"]) == 2
    both = evaluate(tmp_path / "both", "mode=diversity", f"runs=[{runs['mha']},{runs['lrkv']}]")
    assert list(both["result"]) == ["mha-tiny", "lrkv-tiny"]
    for f in ("diversity.csv", "diversity.json", "diversity.png"):
        assert (tmp_path / "both" / f).stat().st_size > 0
    assert "mha-tiny" in both["text"] and "% of H" in both["text"]


# ---- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "lrkv", "mla"])
def test_decode_with_cache_equals_greedy_without(kind):
    model = random_model(kind, seed=2)
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, 12, use_cache=False)[:, 6:]
    dec = decode(model, prompt, 12)
    assert dec.tokens == ref.tolist() and dec.steps == 12


def test_decode_stops():
    model = random_model("mha", seed=2)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, 10, use_cache=False)[:, 4:].tolist()
    stop = ref[0][3]
    dec = decode(model, prompt, 10, stop_token=stop, should_stop=lambda row, new: row == 1 and len(new) == 2)
    first = ref[0][: ref[0].index(stop)]
    assert dec.tokens == [first, ref[1][:2]]


def test_generate_mode(runs, tmp_path):
    out = evaluate(
        tmp_path,
        "mode=generate",
        f"ckpt={runs['lrkv']}",
        "prompt=The for statement",
        "temperature=0",
        "max_new_tokens=16",
        "num_samples=2",
    )
    (sample,) = out["result"]["samples"]
    p = load_pretrained(runs["lrkv"])
    ids = [p.tokenizer.eos_id] + p.tokenizer.encode("The for statement")
    ref = p.model.generate(torch.tensor(ids), 16, use_cache=False)[len(ids) :].tolist()
    if p.tokenizer.eos_id in ref:
        ref = ref[: ref.index(p.tokenizer.eos_id)]
    assert sample["completions"] == [p.tokenizer.decode(ref)] * 2  # greedy: both samples equal
    assert out["result"]["tokens_per_s"] > 0 and "tokens/s" in out["text"]
    assert json.loads((tmp_path / "samples.json").read_text())["samples"][0]["prompt"] == "The for statement"
    sampled = evaluate(
        tmp_path / "s",
        f"ckpt={runs['lrkv']}",
        "prompts=[A,B]",
        "temperature=1.0",
        "top_k=20",
        "top_p=0.9",
        "max_new_tokens=8",
        "seed=1",
    )
    assert sampled["mode"] == "generate" and len(sampled["result"]["samples"]) == 2  # prompts select the mode
    again = evaluate(
        tmp_path / "s2",
        f"ckpt={runs['lrkv']}",
        "prompts=[A,B]",
        "temperature=1.0",
        "top_k=20",
        "top_p=0.9",
        "max_new_tokens=8",
        "seed=1",
    )
    completions = [[s["completions"] for s in r["result"]["samples"]] for r in (sampled, again)]
    assert completions[0] == completions[1]  # seeded sampling repeats
    unconditional = evaluate(tmp_path / "u", "mode=generate", f"ckpt={runs['mha']}", "max_new_tokens=8")
    assert unconditional["result"]["samples"][0]["prompt_tokens"] == 1  # just <|endoftext|>


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.fixture
def corrupt_ckpt(runs, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for f in ("model_config.json", "tokenizer.json"):
        (folder / f).write_text((runs["mha"] / "pretrained" / f).read_text())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt=/no/such/run"], "does not exist"),
        (["mode=footprint", "models=[mha_1b,nope_7b]"], "unknown model preset 'nope_7b'"),
        (["mode=compare", "runs=[/no/such/run]"], "does not exist"),
        (["mode=bogus", "ckpt=x"], "unknown mode 'bogus'"),
        (["mode=generate"], "needs a checkpoint"),
        (["mode=diversity"], "needs a checkpoint"),
        ([], "nothing to evaluate"),
        (["mode=compress"], "needs a method"),
        (["ckpt=x", "compress=eigen"], "checkpoint path x does not exist"),  # the compress group selects the mode
    ],
)
def test_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(LrkvError) as err:
        evaluate(tmp_path, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_error_cases_with_files(runs, tmp_path, corrupt_ckpt):
    for overrides, message in [
        ([f"ckpt={corrupt_ckpt}"], "corrupt"),
        ([f"ckpt={tmp_path}"], "holds no model"),
        (["mode=compare", f"runs=[{tmp_path}]"], "neither a run folder"),
        ([f"ckpt={runs['mha']}", "loss.seq_len=4096"], "exceeds the model's max_seq_len"),
        ([f"ckpt={runs['mha']}", "dtype=int7"], "dtype 'int7' is unknown"),
        (["mode=compare", f"runs=[{runs['mha']}]", "compare.baseline=nobody"], "matches no run"),
    ]:
        with pytest.raises(LrkvError) as err:
            evaluate(tmp_path / "out", *overrides)
        assert message in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "ckpt=/no/such/run", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: checkpoint path /no/such/run does not exist; pass a run folder, "
        "a pretrained folder or a checkpoint file"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_end_to_end_footprint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            "mode=footprint",
            "models=[mha_tiny,lrkv_tiny]",
            "context=256",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lrkv_tiny" in proc.stdout and (tmp_path / "footprint.csv").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()  # outputs land in the Hydra run folder


def test_model_config_errors_are_config_errors():
    with pytest.raises(ConfigError):
        footprint_table([], context=1)


def test_multirun_folder_in_job_order(tmp_path):
    for i, name in ((10, "c"), (2, "b"), (0, "a")):
        write_fake_run(tmp_path / "multi" / f"{i}_{name}", name, "mha", 100, [4.0, 3.5, 3.2, 3.0])
    (tmp_path / "multi" / "multirun.yaml").write_text("hydra: {}\n")
    assert [r["name"] for r in compare_runs([tmp_path / "multi"])["runs"]] == ["a", "b", "c"]
