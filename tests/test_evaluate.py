"""evaluate.py and lrkv.evaluation: every mode through the Hydra entry, checked against direct computations.

lm-eval tests live in tests/test_evaluate_lm_eval.py; the tiny trained runs in tests/evaluate_fixtures.py.
"""

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evaluate_fixtures import DATA_CFG, corpus_spec
from helpers import random_model, randomize, tiny_config
from hydra import compose, initialize_config_dir
from train_helpers import evaluate

from lrkv import ConfigError, LrkvError, Transformer, load_model_config
from lrkv.attention import get_attention_class
from lrkv.data import iter_documents
from lrkv.evaluation.compare import compare_runs, pareto_front, steps_to_target
from lrkv.evaluation.diversity import effective_rank, gram_matrix, head_diversity
from lrkv.evaluation.footprint import footprint_table
from lrkv.evaluation.modes import MODES, prepare
from lrkv.generate import generate_batch
from lrkv.io import load_pretrained, read_metrics

REPO = Path(__file__).resolve().parent.parent
PRESETS_1B = ["mha_1b", "gqa_1b", "mqa_1b", "mla_1b", "lrkv_1b"]

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(command: str) -> tuple[str, dict]:
    """(mode, plain config) of a command line `python evaluate.py ...`, as Hydra composes it; nothing runs."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=shlex.split(command))
    return prepare(cfg)


# ---- modes and commands ---------------------------------------------------------------------------
def test_every_mode_is_registered():
    assert list(MODES) == [
        "loss",
        "lm_eval",
        "footprint",
        "compare",
        "diversity",
        "generate",
        "compress",
        "export",
        "convert",
    ]


# command -> (mode, {"section.key": value}): today's and earlier versions' commands, short forms and nested keys
COMMANDS = {
    "ckpt=outputs/runs/NAME": ("loss", {"ckpt": "outputs/runs/NAME", "loss.split": "val"}),
    "mode=loss ckpt=RUN batch_size=4 loss.max_batches=2": ("loss", {"loss.batch_size": 4, "loss.max_batches": 2}),
    "ckpt=RUN lm_eval.tasks=[hellaswag,arc_easy,piqa,lambada_openai]": (
        "lm_eval",
        {"lm_eval.tasks": ["hellaswag", "arc_easy", "piqa", "lambada_openai"], "lm_eval.batch_size": 8},
    ),
    "ckpt=RUN lm_eval.tasks=[my_task] lm_eval.include_path=/tasks": ("lm_eval", {"lm_eval.include_path": "/tasks"}),
    "mode=lm_eval ckpt=RUN batch_size=2": ("lm_eval", {"lm_eval.batch_size": 2, "lm_eval.tasks": None}),
    "mode=footprint models=[mha_1b,gqa_1b,mqa_1b,mla_1b,lrkv_1b] context=2048 batch_size=1": (
        "footprint",
        {"footprint.models": PRESETS_1B, "footprint.context": 2048, "footprint.batch_size": 1},
    ),
    "mode=footprint": ("footprint", {"footprint.models": PRESETS_1B, "footprint.batch_size": 1}),
    "mode=compare runs=[outputs/multirun/DATE]": ("compare", {"compare.runs": ["outputs/multirun/DATE"]}),
    "runs=[A,B] compare.target=4.0": ("compare", {"compare.runs": ["A", "B"], "compare.target": 4.0}),
    "mode=diversity ckpt=RUN": ("diversity", {"ckpt": "RUN", "diversity.runs": []}),
    "mode=diversity runs=[A,B]": ("diversity", {"diversity.runs": ["A", "B"]}),
    'ckpt=RUN prompt="The attention" max_new_tokens=64 temperature=0.8': (
        "generate",
        {"generate.prompt": "The attention", "generate.max_new_tokens": 64, "generate.temperature": 0.8},
    ),
    "ckpt=RUN prompts=[A,B] top_k=20 num_samples=2": (
        "generate",
        {"generate.prompts": ["A", "B"], "generate.top_k": 20, "generate.num_samples": 2},
    ),
    "mode=generate ckpt=RUN generate.prompt=Hi": ("generate", {"generate.prompt": "Hi"}),
    "ckpt=RUN compress=stief compress.budget=0.6": ("compress", {"compress.method": "stief", "compress.budget": 0.6}),
    "ckpt=RUN compress=eigen": ("compress", {"compress.method": "eigen", "compress.budget": None}),
    "ckpt=RUN compress=stief compress.budgets=[0.5,0.6,0.7,0.8,0.9]": (
        "compress",
        {"compress.budgets": [0.5, 0.6, 0.7, 0.8, 0.9]},
    ),
    "mode=compress ckpt=RUN compress=stief batch_size=4": ("compress", {"loss.batch_size": 4}),
    "mode=export ckpt=RUN out=DIR": ("export", {"ckpt": "RUN", "export.out": "DIR", "export.overwrite": False}),
    "mode=export ckpt=RUN out=DIR overwrite=true": ("export", {"export.overwrite": True}),
    "mode=convert ckpt=RUN to=lrkv rank=R out=DIR": (
        "convert",
        {"convert.to": "lrkv", "convert.rank": "R", "convert.out": "DIR", "convert.overwrite": False},
    ),
    "mode=convert ckpt=RUN convert.to=lrkv convert.rank=8 convert.out=DIR": (
        "convert",
        {"convert.to": "lrkv", "convert.rank": 8, "convert.out": "DIR"},
    ),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_select_their_mode_and_options(command):
    mode, expected = COMMANDS[command]
    name, c = parse(command)
    assert name == mode
    for dotted, value in expected.items():
        node = c
        for key in dotted.split("."):
            node = node[key]
        assert node == value, (command, dotted)


def documented_commands() -> list[str]:
    """Every `python evaluate.py ...` command in README.md, docs/ and configs/ (up to its comment)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "configs").rglob("*.yaml"))]
    commands = []
    for path in files:
        for line in path.read_text().splitlines():
            match = re.search(r"python evaluate\.py ((?:[^ `#]| (?! |#|\())+)", line)
            if match and "=" in match.group(1) and "mode=NAME" not in match.group(1):  # NAME: the synopsis
                commands.append(re.sub(r"<[^>]*>", "X", match.group(1)).replace("...", "X"))
    return commands


def test_every_documented_command_parses():
    commands = documented_commands()
    assert len(commands) >= 15 and "mode=convert ckpt=RUN_DIR to=lrkv rank=R out=DIR" in commands
    for command in commands:
        name, c = parse(command)
        assert name in MODES, command
        if name == "compress":
            assert c["compress"]["method"] in ("stief", "eigen")


def test_missing_unknown_and_misplaced_options_are_one_line_errors(tmp_path):
    listing = "loss, lm_eval, footprint, compare, diversity, generate, compress, export, convert"
    for command, message in [
        ("", f"nothing to evaluate: choose a mode with mode=NAME, one of {listing}"),
        ("mode=bogus", f"unknown mode 'bogus'; use mode=NAME with NAME one of {listing}"),
        ("mode=compare runs=[A] batch_size=2", "batch_size= does not apply to mode=compare"),
        ("mode=loss ckpt=RUN out=DIR", "out= does not apply to mode=loss (it is an option of mode=export"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse(command)
        assert message in str(err.value) and "\n" not in str(err.value), command
    for overrides, message in [
        (["mode=export", "ckpt=RUN"], "mode=export needs an output folder: pass out=DIR"),
        (["mode=export", "out=DIR"], "mode=export needs a checkpoint"),
        (["mode=convert", "ckpt=RUN", "out=DIR"], "mode=convert needs a target kind: pass to=lrkv"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(tmp_path, *overrides)


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


def test_an_earlier_checkpoint_is_compared_with_the_loss_logged_at_its_step(runs, tmp_path):
    """The reference is the validation loss logged at the checkpoint's own step, never the run's final one."""
    import shutil

    from test_io import write_lightning_ckpt

    run = tmp_path / "run"
    shutil.copytree(runs["mha"], run)
    shutil.copy(run / "pretrained" / "tokenizer.json", run / "tokenizer.json")  # as train.py writes it
    model = load_pretrained(run).model
    logged = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert 40 in logged and 50 not in logged and logged[40] != logged[160]
    at_40 = evaluate(
        tmp_path / "a", f"ckpt={write_lightning_ckpt(run / 'checkpoints' / 'step-00000040.ckpt', model, 40)}"
    )
    r = at_40["result"]
    assert r["step"] == 40 and r["logged_val_loss"] == logged[40] and r["logged_step"] == 40
    assert "logged_final_val_loss" not in r and f"val_loss {logged[40]:.4f} at step 40 (same data)" in at_40["text"]
    at_50 = evaluate(
        tmp_path / "b", f"ckpt={write_lightning_ckpt(run / 'checkpoints' / 'step-00000050.ckpt', model, 50)}"
    )
    assert "logged_val_loss" not in at_50["result"] and "logged_final_val_loss" not in at_50["result"]
    assert "training logged no validation loss at step 50" in at_50["text"]
    final = evaluate(tmp_path / "c", f"ckpt={run}")  # the exported model: the run's last step
    assert final["result"]["step"] == 160 and final["result"]["logged_final_val_loss"] == logged[160]


# ---- footprint -------------------------------------------------------------------------------------


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


def test_compare_takes_runs_that_logged_no_validation_loss(runs, tmp_path):
    """A run without validation data: compared on what it has, with a note for each thing left out."""
    bare = []
    for name in ("a", "b"):
        folder = write_fake_run(tmp_path / name, name, "mha", 100, [4.0, 3.5, 3.2, 3.0])
        rows = [line.split(",") for line in (folder / "metrics.csv").read_text().splitlines()]
        (folder / "metrics.csv").write_text("\n".join(",".join(r[:3]) for r in rows) + "\n")  # step,tokens,train_loss
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(final_val_loss=None, final_val_bpb=None)
        (folder / "summary.json").write_text(json.dumps(summary))
        bare.append(folder)
    out = evaluate(tmp_path / "out", "mode=compare", f"runs=[{bare[0]},{bare[1]}]")
    result = out["result"]
    assert result["target"] is None and all(r["steps_to_target"] is None for r in result["runs"])
    assert "the baseline a logged no val_loss: steps to target left out" in out["text"]
    assert "no validation loss logged by a, b" in out["text"]
    assert (tmp_path / "out" / "loss_vs_steps.png").is_file() and not (tmp_path / "out" / "pareto_kv.png").exists()
    assert "note: no validation loss logged by a, b" in (tmp_path / "out" / "compare.md").read_text()
    # with a given target, train loss can still be compared
    train = evaluate(tmp_path / "train", "mode=compare", f"runs=[{bare[0]}]", "compare.metric=train_loss")
    assert train["result"]["target"] == pytest.approx(3.1) and train["result"]["runs"][0]["steps_to_target"] == 400
    # mixed with a run that has validation: the target and the plot come from it, the bare run is noted
    mixed = evaluate(tmp_path / "mixed", "mode=compare", f"runs=[{runs['mha']},{bare[1]}]")
    assert mixed["result"]["target"] == json.loads((runs["mha"] / "summary.json").read_text())["final_val_loss"]
    assert mixed["result"]["runs"][1]["steps_to_target"] is None and "logged by b:" in mixed["text"]
    assert (tmp_path / "mixed" / "pareto_kv.png").is_file()


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
def test_head_qk_maps_are_the_models_projections(kind):
    model = random_model(kind)
    attn = model.blocks[1].attn
    x = torch.randn(1, 5, model.cfg.d_model)
    wq, wk = attn.head_qk_maps()
    b, t, h, dh = 1, 5, model.cfg.n_head, model.cfg.head_dim
    q = attn.wq(x).view(b, t, h, dh)
    k = attn.keys_values(x)[0]  # raw keys per key/value head
    k = k.repeat_interleave(h // k.shape[2], dim=2)
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
    dec = generate_batch(model, prompt, 12)
    assert dec.new_tokens == ref.tolist() and dec.steps == 12


def test_decode_stops():
    model = random_model("mha", seed=2)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, 10, use_cache=False)[:, 4:].tolist()
    stop = ref[0][3]
    dec = generate_batch(model, prompt, 10, stop_token=stop, should_stop=lambda row, new: row == 1 and len(new) == 2)
    first = ref[0][: ref[0].index(stop)]
    assert dec.new_tokens == [first, ref[1][:2]]


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


@pytest.mark.slow  # subprocess
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


@pytest.mark.slow  # subprocess
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


# ---- the writer modes end to end (export: lrkv/export, convert: lrkv/evaluation/conversion.py) -------------
def test_export_mode_writes_a_folder_that_loads_back(runs, tmp_path):
    folder = tmp_path / "hf"
    out = evaluate(tmp_path / "eval", "mode=export", f"ckpt={runs['mha']}", f"out={folder}")
    assert out["mode"] == "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    ours = load_pretrained(runs["mha"]).model
    back = load_pretrained(folder).model if (folder / "model_config.json").exists() else None
    x = torch.randint(0, ours.cfg.vocab_size, (1, 12))
    if back is not None:  # remote-code exports keep our weight names, so lrkv loads them back unchanged
        torch.testing.assert_close(back(x), ours(x), atol=1e-5, rtol=0)
    with pytest.raises(LrkvError, match="not empty"):
        evaluate(tmp_path / "eval2", "mode=export", f"ckpt={runs['mha']}", f"out={folder}")


def test_convert_mode_writes_an_lrkv_folder(runs, tmp_path):
    folder = tmp_path / "lrkv"
    out = evaluate(
        tmp_path / "eval",
        "mode=convert",
        f"ckpt={runs['mha']}",
        "to=lrkv",
        "rank=4",
        f"out={folder}",
        "loss.max_batches=2",
    )
    assert out["mode"] == "convert"
    model = load_pretrained(folder).model
    assert (model.cfg.attention, model.cfg.rank) == ("lrkv", 4)
    with pytest.raises(LrkvError, match="not supported"):
        evaluate(tmp_path / "eval2", "mode=convert", f"ckpt={runs['mha']}", "to=mla", "rank=4", f"out={tmp_path / 'x'}")
