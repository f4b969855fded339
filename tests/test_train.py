"""Training: every kind trains, exact resume, FSDP == single process, checkpoints, logging, errors."""

import json
import math

import pytest
import torch
from train_helpers import (
    compose_train,
    read_rows,
    run_script,
    tiny_overrides,
    train_in_process,
    train_losses,
    val_losses,
)

from lrkv.errors import CheckpointError, ConfigError, LrkvError, TrainingInterrupted
from lrkv.io import load_pretrained
from lrkv.training.monitor import COLUMNS

pytestmark = pytest.mark.slow  # whole training runs


KINDS = ["mha", "gqa", "mqa", "mla", "lrkv"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_and_exports(kind, tmp_path, cache_dir):
    steps = 12
    overrides = tiny_overrides(
        tmp_path, cache_dir, model=f"{kind}_tiny", steps=steps, **{"train.val_every": 6, "train.ckpt_every": 6}
    )
    run_dir = tmp_path / "run"
    summary = train_in_process(overrides, run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])  # loss falls
    assert set(val_losses(run_dir)) == {6, 12}
    header = list(read_rows(run_dir / "metrics.csv")[0])
    assert header == COLUMNS
    assert summary["attention"] == kind and summary["steps"] == steps and summary["tokens"] == steps * 512
    assert summary["kv_bytes_per_token"] == compose_cfg_kv_bytes(overrides)
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert json.loads((run_dir / "summary.json").read_text())["final_val_loss"] == pytest.approx(
        summary["final_val_loss"]
    )
    # the exported model reproduces the validation loss it was logged with
    pretrained = load_pretrained(run_dir)
    assert pretrained.model.cfg.attention == kind and pretrained.tokenizer is not None
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt")) == [
        "step-00000006.ckpt",
        "step-00000012.ckpt",
    ]
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "step-00000012.ckpt"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled code needed
    assert ckpt["global_step"] == steps and "LMDataModule" in ckpt
    assert_same_logits(load_pretrained(run_dir / "checkpoints" / "last.ckpt").model, pretrained.model)


def assert_same_logits(a, b):
    x = torch.randint(0, a.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=0)


def compose_cfg_kv_bytes(overrides):
    from lrkv import ModelConfig

    cfg = compose_train(overrides)
    model = dict(cfg["model"], vocab_size=512)
    return ModelConfig.from_dict(model).kv_cache_bytes_per_token(torch.bfloat16)


class StopAt:
    """Simulate an interruption: request a graceful stop (as SIGTERM does) at a given step."""

    def __new__(cls, step):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == step:
                    for cb in trainer.callbacks:
                        if type(cb).__name__ == "GracefulStop":
                            cb.requested = "SIGTERM"

        return _Stop()


@pytest.mark.parametrize("storage", ["memory", "shards", "stream"])
def test_interrupted_and_resumed_run_matches_uninterrupted(storage, tmp_path, cache_dir):
    steps = 10
    extra = {
        "train.ckpt_every": 4,
        "train.val_every": 5,
        "data.batch_size": 2,
        "train.batch_tokens": 256,  # accumulation 2
        "data.storage": storage,
        "+data.block_documents": 4,
    }
    full = tmp_path / "full"
    train_in_process(tiny_overrides(tmp_path, cache_dir, model="lrkv_tiny", steps=steps, **extra), full)
    part = tmp_path / "part"
    overrides = tiny_overrides(tmp_path, cache_dir, model="lrkv_tiny", steps=steps, **extra)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 7: checkpoint saved"):
        train_in_process(overrides, part, callbacks=[StopAt(6)])  # a "SIGTERM" during step 7: saves and stops after it
    assert max(train_losses(part)) == 7
    assert (part / "checkpoints" / "last.ckpt").resolve().name == "step-00000007.ckpt"
    train_in_process(overrides + ["ckpt_path=last"], part)
    expected, resumed = train_losses(full), train_losses(part)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    assert val_losses(part) == pytest.approx(val_losses(full), abs=1e-6)


@pytest.mark.parametrize("batch_size", [4, 2])  # accumulation 1 and 2
def test_a_resume_between_validations_keeps_the_validation_schedule(batch_size, tmp_path, cache_dir):
    """Stopped during step 3 with val_every=2: the resumed run still validates at steps 4 and 6, as the full run."""
    extra = {"train.ckpt_every": 100, "train.val_every": 2, "data.batch_size": batch_size, "train.batch_tokens": 256}
    overrides = tiny_overrides(tmp_path, cache_dir, steps=6, **extra)
    train_in_process(overrides, tmp_path / "full")
    with pytest.raises(TrainingInterrupted, match="at step 3"):
        train_in_process(overrides, tmp_path / "part", callbacks=[StopAt(2)])
    train_in_process(overrides + ["ckpt_path=last"], tmp_path / "part")
    full, part = val_losses(tmp_path / "full"), val_losses(tmp_path / "part")
    assert sorted(part) == sorted(full) == [2, 4, 6]
    assert part == pytest.approx(full, abs=1e-6)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, cache_dir):
    import lightning as L

    class PoisonAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.model.embed.weight.fill_(float("nan"))

    run_dir = tmp_path / "run"
    with pytest.raises(LrkvError, match="training loss is nan at step 4"):
        train_in_process(tiny_overrides(tmp_path, cache_dir, steps=8), run_dir, callbacks=[PoisonAt()])
    good = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_batch_not_divisible_is_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="train.batch_tokens=1000 is not a multiple of"):
        train_in_process(tiny_overrides(tmp_path, cache_dir, **{"train.batch_tokens": 1000}), tmp_path / "run")


def test_checkpoint_of_another_shape_is_refused(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    train_in_process(tiny_overrides(tmp_path, cache_dir, steps=3), run_dir)
    overrides = tiny_overrides(tmp_path, cache_dir, steps=6, **{"model.n_layer": 3}) + ["ckpt_path=last"]
    with pytest.raises(CheckpointError, match="model.n_layer=2.*this run has 3"):
        train_in_process(overrides, run_dir)


def test_corrupt_checkpoint_is_refused(tmp_path, cache_dir):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        train_in_process(tiny_overrides(tmp_path, cache_dir) + [f"ckpt_path={bad}"], tmp_path / "run")


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, cache_dir):
    base = tiny_overrides(tmp_path, cache_dir)
    cases = [  # (arguments replacing the same keys in base, keys dropped from base, expected text)
        (["model=lrkv_9b"], [], "unknown model 'lrkv_9b'"),
        (["data=wikitext"], [], "unknown data 'wikitext'"),
        (["train.max_stepz=3"], [], "train.max_stepz"),
        (["data=local"], ["data.source"], "missing required value data.source"),
        (["data=local", "data.source=/no/such/corpus.jsonl"], [], "/no/such/corpus.jsonl"),
        (["trainer=fsdp"], [], "trainer=fsdp needs CUDA GPUs"),
        (["data=fineweb_edu"], ["data.source"], "HuggingFaceFW/fineweb-edu"),
    ]
    for extra, drop, expected in cases:
        keys = {a.split("=")[0] for a in extra} | set(drop)
        args = [a for a in base if a.split("=")[0] not in keys] + extra
        result = run_script(args, tmp_path, timeout=120)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, (extra, last)


@pytest.mark.slow
def test_fsdp_two_processes_match_single_process_and_resume(tmp_path, cache_dir):
    """2 CPU processes (gloo) with FSDP2 + Muon == 1 process with the same global batch; sharded resume is exact."""
    common = {"train.ckpt_every": 2, "train.val_every": 2, "train.batch_tokens": 512}
    fsdp = tiny_overrides(
        tmp_path,
        cache_dir,
        model="lrkv_tiny",
        steps=4,
        run_name="fsdp",
        trainer="cpu_fsdp",
        **common,
        **{"data.batch_size": 2},
    )  # 2 x 2 rows x 64 tokens, accumulation 2
    result = run_script(fsdp, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp_dir = tmp_path / "runs" / "fsdp"
    assert (fsdp_dir / "checkpoints" / "step-00000002.ckpt").is_dir()  # sharded: a folder of per-rank files

    single_dir = tmp_path / "single"
    train_in_process(
        tiny_overrides(
            tmp_path,
            cache_dir,
            model="lrkv_tiny",
            steps=4,
            run_name="single",
            **common,
            **{"data.batch_size": 4, "trainer": "cpu"},
        ),
        single_dir,
    )
    assert train_losses(fsdp_dir) == pytest.approx(train_losses(single_dir), abs=2e-5)
    assert val_losses(fsdp_dir) == pytest.approx(val_losses(single_dir), abs=2e-5)
    exported_fsdp, exported_single = load_pretrained(fsdp_dir).model, load_pretrained(single_dir).model
    for (name, a), b in zip(exported_fsdp.state_dict().items(), exported_single.state_dict().values()):
        diff = (a - b).abs()
        if name.startswith("blocks."):  # Muon orthogonalised whole matrices on both (a shard-wise Muon is ~1e-3 off)
            assert diff.max() < 1e-6, name
        else:  # AdamW: g / (sqrt(v) + eps) amplifies rounding where gradients are ~0 (rare tokens)
            assert (diff > 1e-5).float().mean() < 1e-3, name

    assert_same_logits(load_pretrained(fsdp_dir / "checkpoints" / "step-00000004.ckpt").model, exported_fsdp)

    resume = [a for a in fsdp if not a.startswith("run_name=")]
    resume += ["run_name=fsdp_resumed", f"ckpt_path={fsdp_dir / 'checkpoints' / 'step-00000002.ckpt'}"]
    result = run_script(resume, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = train_losses(tmp_path / "runs" / "fsdp_resumed")
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({k: v for k, v in train_losses(fsdp_dir).items() if k > 2}, abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path, cache_dir):
    """A real SIGINT to `python train.py`: it finishes the step, saves, exits 130; ckpt_path=last continues exactly."""
    import signal
    import subprocess
    import sys
    import time

    from train_helpers import ROOT, clean_env

    steps = 40
    args = tiny_overrides(tmp_path, cache_dir, steps=steps, **{"train.ckpt_every": 100, "train.val_every": 0})
    run_dir = tmp_path / "runs" / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.csv").exists() and len(train_losses(run_dir)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped: SIGINT at step" in err.strip().splitlines()[-1]
    stopped_at = max(train_losses(run_dir))
    assert 3 <= stopped_at < steps
    last = (run_dir / "checkpoints" / "last.ckpt").resolve()
    assert last.name == f"step-{stopped_at:08d}.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stopped_at

    result = run_script(args + ["ckpt_path=last"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = tmp_path / "reference"
    train_in_process(args, reference)
    assert train_losses(run_dir) == pytest.approx(train_losses(reference), abs=1e-6)


@pytest.mark.slow
def test_multirun_sweeps_kinds_and_ranks(tmp_path, cache_dir):
    args = [
        a for a in tiny_overrides(tmp_path, cache_dir, steps=2, **{"train.val_every": 2}) if not a.startswith("model=")
    ]
    result = run_script(["-m", "model=mha_tiny,lrkv_tiny", *args], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "multirun").glob("*/*") if (p / "summary.json").exists())
    assert runs == ["0_mha_tiny", "1_lrkv_tiny"]

    ranks = tmp_path / "ranks"
    ranks.mkdir()
    rank_args = [a.replace(str(tmp_path), str(ranks)) if a.startswith("paths.output_dir") else a for a in args]
    result = run_script(["-m", "model=lrkv_tiny", "model.rank=2,4", *rank_args], ranks, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted(ranks.glob("multirun/*/*/summary.json"))]
    assert [s["model_config"]["rank"] for s in summaries] == [2, 4]
    assert summaries[0]["kv_bytes_per_token"] < summaries[1]["kv_bytes_per_token"]


@pytest.mark.slow
def test_optuna_sweep_minimises_validation_loss(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = [a for a in tiny_overrides(tmp_path, cache_dir, steps=2, **{"train.val_every": 2}) if a != "run_name=run"]
    result = run_script(["hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", *args], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    optimization = next((tmp_path / "multirun").glob("*/optimization_results.yaml")).read_text()
    assert "best_value" in optimization
    assert len(list((tmp_path / "multirun").glob("*/*/summary.json"))) == 2


@pytest.mark.slow
def test_wandb_logger_offline(tmp_path, cache_dir):
    result = run_script(tiny_overrides(tmp_path, cache_dir, steps=2) + ["logger=wandb"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "runs" / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    import lrkv.training.checkpointing as checkpointing

    run_dir = tmp_path / "run"
    train_in_process(tiny_overrides(tmp_path, cache_dir, steps=3), run_dir)
    good = (run_dir / "checkpoints" / "last.ckpt").resolve()

    def crash(checkpoint, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "_write_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        train_in_process(tiny_overrides(tmp_path, cache_dir, steps=6) + ["ckpt_path=last"], run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").resolve() == good
    assert torch.load(good, weights_only=True)["global_step"] == 3
    assert not (run_dir / "checkpoints" / "step-00000006.ckpt").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step-00000003.ckpt"]


@pytest.mark.slow
def test_fsdp_resume_of_a_streamed_corpus_restores_every_rank(tmp_path, cache_dir):
    """storage=stream: each rank has its own stream position; a sharded checkpoint keeps all of them."""
    args = tiny_overrides(
        tmp_path,
        cache_dir,
        model="mqa_tiny",
        steps=4,
        run_name="stream",
        trainer="cpu_fsdp",
        **{
            "train.ckpt_every": 2,
            "train.val_every": 0,
            "train.batch_tokens": 256,
            "data.batch_size": 2,
            "data.storage": "stream",
            "+data.block_documents": 1,
            "data.source": "embedded:docstrings",
        },
    )  # short documents: ranks' blocks end at different steps
    result = run_script(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "stream"
    meta = torch.load(run_dir / "checkpoints" / "step-00000002.ckpt" / "meta.pt", weights_only=True)
    ranks = meta["LMDataModule"]["train"]["ranks"]
    assert len(ranks) == 2 and ranks[0] != ranks[1]  # one position per rank (they differ: documents differ in length)
    resume = [a for a in args if not a.startswith("run_name=")]
    resume += ["run_name=stream_resumed", f"ckpt_path={run_dir / 'checkpoints' / 'step-00000002.ckpt'}"]
    result = run_script(resume, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = train_losses(tmp_path / "runs" / "stream_resumed")
    assert resumed == pytest.approx({k: v for k, v in train_losses(run_dir).items() if k > 2}, abs=1e-6)
