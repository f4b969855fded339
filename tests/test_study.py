"""The small-scale study: its corpus (embedded:stdlib_code), the recipe readings it depends on (separate weight
decay for the Muon and AdamW groups, Muon momentum warmup), the aggregation over seeds, and a short version of
experiment=study_small end to end."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import CONFIGS, compose_train, run_script

from lrkv import Transformer, load_model_config
from lrkv.data.corpus import CorpusSpec, corpus_key, embedded_documents, is_validation, iter_documents
from lrkv.errors import ConfigError
from lrkv.evaluation.study import report_study, study_runs
from lrkv.training.optim import MuonAdamW, build_optimizer, muon_momentum

CODE = CorpusSpec(source="embedded:stdlib_code", val_fraction=0.05)


# --------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def code_files():
    from lrkv.data.corpus import stdlib_code_files

    return stdlib_code_files()


def test_stdlib_code_is_every_source_file_once(code_files):
    paths = [p for p, _ in code_files]
    assert len(paths) > 500 and len(set(paths)) == len(paths)
    assert paths.index("json/__init__.py") < paths.index("json/decoder.py") < paths.index("json/tool.py")
    assert all(p.endswith(".py") and not p.startswith("/") and "site-packages/" not in p for p in paths)
    assert "json/decoder.py" in paths  # a plain module, as its source text
    text = dict(code_files)["json/decoder.py"]
    assert "class JSONDecoder" in text and "def " in text
    assert embedded_documents("stdlib_code") == [t for _, t in code_files]
    assert sum(len(t) for _, t in code_files) > 5_000_000  # MBs of code: the docstring corpus is ~1.6M tokens


def test_stdlib_code_held_out_by_path_hash(code_files):
    train = list(iter_documents(CODE, "train"))
    val = list(iter_documents(CODE, "val"))
    expected_val = [t for p, t in code_files if is_validation(p, 0.05, 0)]
    assert val == expected_val and 0.02 < len(val) / len(code_files) < 0.09
    assert len(train) + len(val) == len(code_files)
    assert not {id(t) for t in train} & {id(t) for t in val}
    other = list(iter_documents(CorpusSpec(source="embedded:stdlib_code", val_fraction=0.05, split_seed=1), "val"))
    assert other != val  # the split has its own seed


def test_stdlib_code_split_follows_the_path_not_the_text(monkeypatch, code_files):
    import lrkv.data.corpus as corpus

    val_paths = {p for p, _ in code_files if is_validation(p, 0.05, 0)}
    edited = tuple((p, t + f"\n# edited {i}\n") for i, (p, t) in enumerate(code_files))
    monkeypatch.setattr(corpus, "stdlib_code_files", lambda: edited)
    val = list(iter_documents(CODE, "val"))
    assert val == [t for p, t in edited if p in val_paths]  # same files held out although every text changed


def test_stdlib_code_max_documents_and_key(code_files):
    head = CorpusSpec(source="embedded:stdlib_code", val_fraction=0.5, max_documents=40)
    docs = list(iter_documents(head, "train")) + list(iter_documents(head, "val"))
    assert sorted(docs) == sorted(t for _, t in code_files[:40])
    key = corpus_key(CODE)
    assert key["spec"]["source"] == "embedded:stdlib_code" and "python" in key
    with pytest.raises(ConfigError, match="stdlib_code"):
        embedded_documents("nothing")


def test_default_run_keeps_the_docstring_corpus():
    assert compose_train([])["data"]["source"] == "embedded"
    assert compose_train(["experiment=study_small"])["data"]["source"] == "embedded:stdlib_code"


# --------------------------------------------------------------------------- recipe readings (optim)


def test_muon_momentum_warmup_schedule():
    ramp = [muon_momentum(s, start=0.85, final=0.95, warmup_steps=300) for s in (0, 150, 300, 1000)]
    assert ramp == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum(0, start=0.85, final=0.95, warmup_steps=0) == 0.95


def _optim_cfg(**extra):
    cfg = yaml.safe_load((CONFIGS / "optim" / "muon.yaml").read_text())
    cfg.update(extra)
    return cfg


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(load_model_config("mha_tiny", n_layer=1, d_model=32, head_dim=8, n_head=4, vocab_size=64))


def _steps(model, opt, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    momenta = []
    for _ in range(n):
        x = torch.randint(0, 64, (2, 9), generator=gen)
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        momenta.append(next(g["momentum"] for g in opt.param_groups if g.get("use_muon")))
    return momenta


def test_muon_momentum_warmup_matches_manual_schedule_and_resumes(one_thread):
    cfg = _optim_cfg(momentum_warmup_steps=4, momentum_start=0.85, momentum=0.95)
    model = _tiny_model()
    opt = build_optimizer(model, cfg)
    assert _steps(model, opt, 6) == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])

    # Reference: no warmup, the momentum set by hand before each step
    ref = _tiny_model()
    ref_opt = build_optimizer(ref, _optim_cfg())
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        for g in ref_opt.param_groups:
            if g.get("use_muon"):
                g["momentum"] = muon_momentum(step, start=0.85, final=0.95, warmup_steps=4)
        x = torch.randint(0, 64, (2, 9), generator=gen)
        torch.nn.functional.cross_entropy(ref(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Exact resume: the warmup position travels in the optimizer's state dict
    first = _tiny_model()
    opt1 = build_optimizer(first, cfg)
    _steps(first, opt1, 2)
    state = opt1.state_dict()
    resumed = _tiny_model()
    resumed.load_state_dict(first.state_dict())
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(state)
    assert _steps(resumed, opt2, 4, seed=2) == pytest.approx([0.9, 0.925, 0.95, 0.95])


def test_separate_weight_decay_for_muon_and_adamw_groups():
    model = _tiny_model()
    opt = build_optimizer(model, _optim_cfg(weight_decay=0.1, muon_weight_decay=0.0))
    groups = {g["name"]: g for g in opt.param_groups}
    assert (groups["matrix"]["weight_decay"], groups["embed"]["weight_decay"], groups["head"]["weight_decay"]) == (
        0.0,
        0.1,
        0.1,
    )
    same = {g["name"]: g for g in build_optimizer(model, _optim_cfg(weight_decay=0.1)).param_groups}
    assert same["matrix"]["weight_decay"] == 0.1  # muon_weight_decay: null follows weight_decay
    adamw = yaml.safe_load((CONFIGS / "optim" / "adamw.yaml").read_text())
    plain = {g["name"]: g for g in build_optimizer(model, {**adamw, "muon_weight_decay": 0.0}).param_groups}
    assert plain["matrix"]["weight_decay"] == adamw["weight_decay"]  # no Muon group: nothing to apply it to

    # Behaviour: a Muon matrix with a zero gradient only decays, by lr x muon_weight_decay
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = MuonAdamW([dict(params=[w], lr=0.5, use_muon=True, weight_decay=0.2)])
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 0.9))


def test_momentum_warmup_must_not_be_negative():
    with pytest.raises(ConfigError, match="momentum_warmup_steps"):
        build_optimizer(_tiny_model(), _optim_cfg(momentum_warmup_steps=-1))


def test_recipe_readings_of_paper_and_study():
    paper = compose_train(["experiment=paper_128m", "tokenizer.path=/models/gpt2"])["optim"]
    assert (paper["weight_decay"], paper["muon_weight_decay"], paper["momentum_warmup_steps"]) == (0.1, 0.1, 300)
    study = compose_train(["experiment=study_small"])["optim"]
    assert (study["weight_decay"], study["muon_weight_decay"], study["momentum_warmup_steps"]) == (0.0, 0.0, 125)
    default = compose_train([])["optim"]
    assert (default["momentum_warmup_steps"], default["muon_weight_decay"]) == (0, None)  # unchanged defaults


# --------------------------------------------------------------------------- the study configs


def _sweep(experiment: str) -> dict:
    return yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())["hydra"]["sweeper"]["params"]


def test_study_small_shape_and_budget():
    cfg = compose_train(["experiment=study_small"])
    model = cfg["model"]
    assert model["n_head"] >= 8 and model["d_model"] == model["n_head"] * model["head_dim"]
    assert cfg["train"]["batch_tokens"] == cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    ranks = compose_train(["experiment=study_small_ranks"])
    assert ranks["train"] == cfg["train"] and ranks["optim"] == cfg["optim"] and ranks["data"] == cfg["data"]
    variants = str(_sweep("study_small")["model"]).split(",")
    assert {load_model_config(v).attention for v in variants} == {"mha", "gqa", "mqa", "mla", "lrkv"}
    decoupled = load_model_config("lrkv_dec_xsmall")  # the decoupled LRKV, same rank and shape as lrkv_xsmall
    assert "lrkv_dec_xsmall" in variants and decoupled.residual_rope is False
    assert decoupled.to_dict() == {
        **load_model_config("lrkv_xsmall").to_dict(),
        "name": "lrkv_dec_xsmall",
        "residual_rope": False,
    }
    swept = str(_sweep("study_small_ranks")["model.rank"]).split(",")
    assert len(swept) >= 3 and "0" in swept  # with lrkv_xsmall's r = 6: >= 4 ranks including 0
    assert "14" in swept and model["head_dim"] * 7 // 8 == 14
    for size, r_eq in (("xsmall", 14), ("small", 28)):  # the study's shape, and the larger one
        mha = load_model_config(f"mha_{size}")
        equal = load_model_config(f"lrkv_{size}", rank=r_eq)
        assert equal.kv_cache_bytes_per_token() == mha.kv_cache_bytes_per_token()  # the MHA-cache anchor
        mqa = load_model_config(f"mqa_{size}")
        zero = load_model_config(f"lrkv_{size}", rank=0)
        assert zero.kv_cache_bytes_per_token() == mqa.kv_cache_bytes_per_token()  # the MQA anchor
        for kind, ratio in (("gqa", 0.5), ("lrkv", 0.5), ("mqa", 1 / 8), ("mla", 0.15625)):
            cfg_k = load_model_config(f"{kind}_{size}")
            assert cfg_k.n_head == 8 and cfg_k.kv_cache_bytes_per_token() == ratio * mha.kv_cache_bytes_per_token()


def test_study_128m_is_the_paper_recipe_at_128m():
    cfg = compose_train(["experiment=study_128m", "tokenizer.path=/models/gpt2"])
    assert cfg["model"]["d_model"] == 768 and cfg["data"]["source"] == "hf:HuggingFaceFW/fineweb-edu"
    params = _sweep("study_128m")
    assert set(str(params["model"]).split(",")) == {"mha_128m", "gqa_128m", "mqa_128m", "mla_128m", "lrkv_128m"}
    assert str(params["seed"]).split(",") == ["0", "1", "2"]


# --------------------------------------------------------------------------- aggregation


def _fake_run(root: Path, name: str, model: dict, seed: int, val: list[float], kv: int) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": model, "seed": seed}))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "val_loss", "val_bpb"])
        for i, v in enumerate(val, 1):
            w.writerow([10 * i, 1000 * i, v, v / 2])
    summary = {
        "name": model["name"],
        "attention": model["attention"],
        "final_val_loss": val[-1],
        "final_val_bpb": val[-1] / 2,
        "kv_bytes_per_token": kv,
        "params": 100,
        "steps": 10 * len(val),
        "tokens": 1000 * len(val),
        "tokens_per_s": 50.0 + seed,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_study_aggregates_over_seeds(tmp_path):
    mha = {"name": "mha_small", "attention": "mha"}
    lrkv = {"name": "lrkv_small", "attention": "lrkv", "rank": 12}
    mqa = {"name": "mqa_small", "attention": "mqa"}
    for seed, last in enumerate((3.0, 3.2, 3.1)):
        _fake_run(tmp_path, f"mha_s{seed}", mha, seed, [4.0, 3.5, last], 400)
    for seed, (mid, last) in enumerate(((3.08, 2.9), (3.09, 3.05), (3.2, 3.0))):
        _fake_run(tmp_path, f"lrkv_s{seed}", lrkv, seed, [4.0, mid, last], 200)
    _fake_run(tmp_path, "r0", {**lrkv, "name": "lrkv_small_r0", "rank": 0}, 0, [4.0, 3.6, 3.4], 50)
    _fake_run(tmp_path, "r28", {**lrkv, "name": "lrkv_small_r28", "rank": 28}, 0, [4.0, 3.5, 3.1], 400)
    _fake_run(tmp_path, "mqa_s0", mqa, 0, [4.0, 3.7, 3.5], 50)
    result = study_runs([tmp_path], diversity=False)
    rows = {r["variant"]: r for r in result["rows"]}
    assert [r["variant"] for r in result["rows"]] == ["mha", "mqa", "lrkv r=0", "lrkv r=12", "lrkv r=28"]
    assert result["target"] == pytest.approx(3.1)
    assert rows["mha"]["val_loss"] == pytest.approx(3.1)
    assert rows["mha"]["val_loss_std"] == pytest.approx(statistics.stdev([3.0, 3.2, 3.1]))
    assert rows["lrkv r=12"]["val_bpb"] == pytest.approx(2.9833333 / 2, rel=1e-5)
    # steps to MHA's mean final loss (3.1): lrkv seeds reach it at 20, 20, 30; MHA at 30 (s0, s2), never (s1)
    assert (rows["lrkv r=12"]["steps_to_mha"], rows["lrkv r=12"]["reached_mha"]) == (pytest.approx(70 / 3), 3)
    assert (rows["mha"]["steps_to_mha"], rows["mha"]["reached_mha"]) == (30, 2)
    assert rows["lrkv r=0"]["val_loss_std"] is None and rows["lrkv r=0"]["seeds"] == 1
    # paired by seed: lrkv - mha = -0.1, -0.15, -0.1; the single-seed r=0 pairs with MHA's seed 0 only
    assert rows["lrkv r=12"]["diff_vs_mha"] == pytest.approx(-0.35 / 3)
    assert rows["lrkv r=12"]["diff_vs_mha_std"] == pytest.approx(statistics.stdev([-0.1, -0.15, -0.1]))
    assert (rows["lrkv r=0"]["diff_vs_mha"], rows["lrkv r=0"]["paired_seeds"]) == (pytest.approx(0.4), 1)
    records = result["records"]
    assert len(records) == 9 and all(
        {"kind", "rank", "seed", "val_loss", "val_bpb", "kv_bytes_per_token", "tokens", "steps"} <= set(r)
        for r in records
    )
    anchors = {a["reference"]: a for a in result["anchors"]}
    assert anchors["mqa"]["lrkv"] == "lrkv r=0" and anchors["mqa"]["val_loss_diff"] == pytest.approx(-0.1)
    assert anchors["mha"]["lrkv"] == "lrkv r=28" and anchors["mha"]["val_loss_diff"] == pytest.approx(0.0, abs=1e-9)
    assert anchors["mha"]["within_noise"] and anchors["mha"]["noise"] == pytest.approx(0.1 * math.sqrt(2))

    text = report_study(result, tmp_path / "out", "s")
    assert "3.1000 ± 0.1000" in text and "lrkv r=28 vs mha" in text and "-0.1167 ± 0.0289 (n=3)" in text
    for name in ("s.md", "s.json", "s-loss.png", "s-pareto.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "s.json").read_text())
    assert saved["records"] == json.loads(json.dumps(records)) and "runs" not in saved


def test_study_labels_the_decoupled_variant_apart(tmp_path):
    lrkv = {"name": "lrkv_small", "attention": "lrkv", "rank": 12}
    _fake_run(tmp_path, "a", lrkv, 0, [3.0], 200)
    _fake_run(tmp_path, "b", {**lrkv, "name": "lrkv_dec_small", "residual_rope": False}, 0, [3.1], 200)
    result = study_runs([tmp_path], diversity=False)
    assert [r["variant"] for r in result["rows"]] == ["lrkv r=12", "lrkv-decoupled r=12"]
    assert result["target"] is None  # no MHA run: no steps-to-target column values
    assert all(r["steps_to_mha"] is None for r in result["rows"])


def test_study_without_runs_is_a_clear_error(tmp_path):
    from lrkv.errors import DataError

    with pytest.raises(DataError, match="multirun folder"):
        study_runs([tmp_path], diversity=False)


# --------------------------------------------------------------------------- the study, end to end (short)


@pytest.mark.slow
def test_short_study_end_to_end(tmp_path):
    cache_dir = tmp_path / "cache"
    args = [
        "experiment=study_small",
        "model=mha_xsmall,lrkv_xsmall",
        "seed=0",
        "model.n_layer=1",
        "model.n_head=4",
        "model.d_model=64",
        "model.head_dim=16",
        "model.max_seq_len=32",
        "+data.max_documents=30",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.val_batches=2",
        "tokenizer.vocab_size=512",
        "train.batch_tokens=128",
        "train.max_steps=4",
        "train.val_every=2",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "optim.momentum_warmup_steps=2",
        "callbacks=none",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
    ]
    result = run_script(args, tmp_path, timeout=300, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "study_small" / "report"
    saved = json.loads((report / "study.json").read_text())
    assert sorted((r["kind"], r["rank"], r["seed"], r["steps"], r["tokens"]) for r in saved["records"]) == [
        ("lrkv", 6, 0, 4, 512),
        ("mha", None, 0, 4, 512),
    ]
    mha = next(r for r in saved["records"] if r["kind"] == "mha")
    assert saved["target"] == pytest.approx(mha["val_loss"]) and mha["steps_to_mha"] is not None
    assert all(math.isfinite(r["val_loss"]) and r["kv_bytes_per_token"] > 0 for r in saved["records"])
    md = (report / "study.md").read_text()
    assert "| mha | 1 |" in md and "lrkv r=6" in md and (report / "study-loss.png").exists()
