"""The pipeline as a user runs it: train.py outputs -> evaluate.py loss / compress / compare, and the compression
study."""

import json
from pathlib import Path

import pytest
import torch
from train_helpers import run_script, tiny_overrides, train_in_process, val_losses

from lrkv.io import load_pretrained

pytestmark = pytest.mark.slow  # train.py runs, then evaluate.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MHA and a tiny LRKV trained by train.py's code path (in process)."""
    root = tmp_path_factory.mktemp("trained")
    cache = root / "cache"
    runs = {}
    for kind in ("mha", "lrkv"):
        extra = {"data.batch_size": 8, "train.val_every": 40, "optim.warmup_steps": 5, "run_name": kind}
        train_in_process(tiny_overrides(root, cache, model=f"{kind}_tiny", steps=80, **extra), root / "runs" / kind)
        runs[kind] = root / "runs" / kind
    return runs


def test_evaluate_loss_reproduces_the_logged_validation_loss(trained, tmp_path):
    result = run_script([f"ckpt={trained['mha']}", f"out_dir={tmp_path}"], tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    loss = json.loads((tmp_path / "loss.json").read_text())
    assert loss["loss"] == pytest.approx(val_losses(trained["mha"])[80], abs=1e-4)
    assert loss["bpb"] == pytest.approx(
        json.loads((trained["mha"] / "summary.json").read_text())["final_val_bpb"], abs=1e-4
    )


def test_compress_then_compare_with_trained_models(trained, tmp_path):
    out = tmp_path / "compress"
    args = [
        f"ckpt={trained['mha']}",
        "compress=stief",
        "compress.budgets=[0.5,0.75]",
        "compress.calib.n_seqs=16",
        "compress.stief.epochs=2",
        f"out_dir={out}",
    ]
    result = run_script(args, tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((out / "compression.json").read_text())["rows"]}
    source = rows["mha"]
    for budget in (0.5, 0.75):
        row = next(r for r in rows.values() if r["budget"] == budget)
        assert row["kv_bytes_per_token"] == int(
            budget * source["kv_bytes_per_token"]
        )  # ranks fill the budget exactly here
        assert row["val_loss"] > source["val_loss"] - 1e-3
        folder = out / f"stief_{budget:g}"
        model = load_pretrained(folder).model
        assert model.cfg.attention == "compressed_kv"
        cache = model.new_cache(1, 8, dtype=torch.bfloat16)
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long), cache)
        assert cache.nbytes_per_token() == row["kv_bytes_per_token"]
    compare = tmp_path / "compare"
    runs = f"runs=[{trained['mha']},{trained['lrkv']},{out / 'stief_0.5'},{out / 'stief_0.75'}]"
    result = run_script(["mode=compare", runs, f"out_dir={compare}"], tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (compare / "compare.md").read_text()
    assert table.count("compressed_kv") == 2 and "| lrkv" in table.replace("| lrkv |", "| lrkv")
    assert (compare / "pareto_kv.png").stat().st_size > 1000


def test_compressing_an_lrkv_model_is_a_clear_error(trained, tmp_path):
    result = run_script(
        [f"ckpt={trained['lrkv']}", "compress=eigen", f"out_dir={tmp_path}"], tmp_path, script="evaluate.py"
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "lrkv" in last


def test_bad_budget_is_a_one_line_error(trained, tmp_path):
    result = run_script(
        [f"ckpt={trained['mha']}", "compress=stief", "compress.budget=1.5", f"out_dir={tmp_path}"],
        tmp_path,
        script="evaluate.py",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "budget" in last


def test_compression_study_experiment(tmp_path):
    """experiment=compress_study: trains the sweep, then compresses MHA with both methods: one table, one plot."""
    args = [
        a
        for a in tiny_overrides(tmp_path, tmp_path / "cache", steps=20, **{"train.val_every": 10})
        if not a.startswith(("model=", "run_name="))
    ]
    args += [
        "experiment=compress_study",
        "model=mha_tiny,lrkv_tiny",
        "hydra.callbacks.compression_study.budgets=[0.5,0.75]",
        "hydra.callbacks.compression_study.options.stief.epochs=2",
        "hydra.callbacks.compression_study.options.calib.n_seqs=16",
    ]
    result = run_script(args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    study = next((tmp_path / "multirun").glob("*/compression_study"))
    table = (study / "compare.md").read_text()
    for name in ("study_mha_tiny", "study_lrkv_tiny", "study_mha_tiny-eigen-0.50", "study_mha_tiny-stief-0.75"):
        assert name in table
    assert (study / "pareto_kv.png").stat().st_size > 1000


def test_a_local_hugging_face_llama_folder_evaluates_and_compresses(trained, tmp_path):
    """A Llama folder (built locally with transformers) is a checkpoint like any other for evaluate.py."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text((trained["mha"] / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    data = ["data=embedded", "data.source=embedded:topics", "data.val_batches=2"]
    result = run_script([f"ckpt={folder}", *data, f"out_dir={tmp_path / 'loss'}"], tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    loss = json.loads((tmp_path / "loss" / "loss.json").read_text())
    assert loss["attention"] == "gqa" and abs(loss["loss"] - torch.log(torch.tensor(512.0)).item()) < 0.5  # random init
    args = [
        f"ckpt={folder}",
        "compress=eigen",
        "compress.budget=0.75",
        "compress.calib.source=embedded:topics",
        "compress.calib.n_seqs=12",
        *data,
        f"out_dir={tmp_path / 'compress'}",
    ]
    result = run_script(args, tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "compress" / "compression.json").read_text())["rows"]
    assert rows[1]["kv_ratio"] <= 0.75 and rows[1]["kv_bytes_per_token"] < rows[0]["kv_bytes_per_token"]


def test_compressed_models_are_scored_on_lm_eval_tasks(trained, tmp_path):
    data = Path(__file__).resolve().parent / "data" / "lm_eval"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text((data / "tiny_mc.yaml").read_text().replace("DATA_DIR", str(data)))
    out = tmp_path / "out"
    args = [
        f"ckpt={trained['mha']}",
        "compress=eigen",
        "compress.budget=0.75",
        "compress.calib.n_seqs=12",
        "lm_eval.tasks=[lrkv_tiny_mc]",
        f"lm_eval.include_path={tasks}",
        "lm_eval.include_defaults=false",
        f"out_dir={out}",
    ]
    result = run_script(args, tmp_path, script="evaluate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out / "compression.json").read_text())["rows"]
    accuracy = rows[1]["lm_eval"]["lrkv_tiny_mc"]["acc,none"]  # lm-eval names metrics "metric,filter"
    assert 0.0 <= accuracy <= 1.0
