"""Reliability and the console (issue 15) and the hot path of a step: tiny in-process runs where possible.

One test per point: resume rules, finite checkpoints and the NaN guard, the run-folder lock, failed
writes, the umask, settings checks, skipped documents, the console, compression progress; plus one
host sync per optimizer step and the final validation of every run.
"""

import collections
import errno
import json
import logging
import os

import lightning as L
import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode
from train_helpers import compose_train, run_script, tiny_overrides, train_in_process, train_losses, val_losses

from lrkv.errors import CheckpointError, ConfigError, DataError, OutputError
from lrkv.training.optim import lr_factor
from lrkv.training.step import NonFiniteStep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # training runs with injected faults


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def rows_of(run_dir):
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- hot path: one host sync per optimizer step; every run validates at its end -------------------
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class CountHostReads(L.Callback):
    """Counts reads of tensor values by the host (item, tolist, bool(), float() ...) per optimizer step.

    On CUDA each is a device sync. The optimizer's step counters are left out: they live on the CPU
    (Lightning keeps optimizer `step` states there), so reading them never waits for the device."""

    def __init__(self):
        self.per_step, self.mode = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.mode is None:
            optimizer, counts = trainer.optimizers[0], collections.Counter()

            def step_counter(t) -> bool:
                return any(t is state.get("step") for state in optimizer.state.values())

            class Mode(TorchFunctionMode):
                def __torch_function__(self, func, types, args=(), kwargs=None):
                    if func in HOST_READS and not (args and step_counter(args[0])):
                        counts[func.__name__] += 1
                    return func(*args, **(kwargs or {}))

            self.counts, self.mode = counts, Mode()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.per_step.append(sum(self.counts.values()))
            self.counts.clear()

    def on_train_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


def test_one_host_sync_per_optimizer_step_and_a_final_validation(tmp_path, cache_dir):
    """Accumulation 4: four micro-batches, one read of (loss, grad norm) per step; val_every=0 validates once,
    at the end. A stale lock (a killed run's) in the folder is taken over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("pid 999999 on elsewhere, since 2026-01-01 00:00:00")  # lock free, file left
    counter = CountHostReads()
    extra = {"train.val_every": 0, "train.ckpt_every": 0, "train.log_every": 100, "data.batch_size": 2}
    summary = train_in_process(tiny_overrides(tmp_path, cache_dir, steps=4, **extra), run_dir, callbacks=[counter])
    assert len(counter.per_step) == 4 and max(counter.per_step) <= 1, counter.per_step
    assert list(val_losses(run_dir)) == [4]  # the final validation
    assert isinstance(summary["final_val_loss"], float) and summary["final_train_loss"] is not None
    assert (run_dir / ".lock").read_text() == ""  # released cleanly


def test_every_run_validates_at_its_last_step(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    summary = train_in_process(tiny_overrides(tmp_path, cache_dir, steps=5, **{"train.val_every": 3}), run_dir)
    assert sorted(val_losses(run_dir)) == [3, 5]
    assert summary["final_val_loss"] == pytest.approx(val_losses(run_dir)[5])
    assert json.loads((run_dir / "summary.json").read_text())["final_val_loss"] == pytest.approx(val_losses(run_dir)[5])


# ---- 1. resume: budget extension recomputes the schedule; what cannot change is refused ----------------
def test_resume_extends_the_budget_applies_new_rates_and_refuses_the_rest(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    base = {"train.val_every": 0, "train.ckpt_every": 2, "optim.warmup_steps": 2}
    train_in_process(tiny_overrides(tmp_path, cache_dir, steps=4, **base), run_dir)
    lr = {int(r["step"]): float(r["lr"]) for r in rows_of(run_dir) if r["lr"]}
    schedule = dict(schedule="cosine", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr[4] == pytest.approx(0.02 * lr_factor(4, total_steps=4, **schedule)) == 0.0  # the finished schedule

    for extra, words in [
        ({"optim": "adamw"}, "optim.name='muon', this run has 'adamw'"),
        ({"seed": 1}, "seed=0, this run has 1"),
        ({"data.source": "embedded:docstrings"}, "data.source="),
        ({"train.max_steps": 3}, "is at step 4 and this run's budget is 3 steps"),
    ]:
        with pytest.raises(CheckpointError, match=words):
            overrides = tiny_overrides(tmp_path, cache_dir, **{**base, "train.max_steps": 8, **extra})
            train_in_process(overrides + ["ckpt_path=last"], run_dir)

    more = tiny_overrides(tmp_path, cache_dir, steps=8, **{**base, "optim.matrix_lr": 0.01}) + ["ckpt_path=last"]
    train_in_process(more, run_dir)
    assert "budget 4 -> 8 steps" in capsys.readouterr().out
    lr = {int(r["step"]): float(r["lr"]) for r in rows_of(run_dir) if r["lr"]}
    assert sorted(lr) == list(range(1, 9))
    for step in range(5, 9):  # the new rate on the schedule of the new total, from the first resumed step
        assert lr[step] == pytest.approx(0.01 * lr_factor(step, total_steps=8, **schedule)), step
    assert lr[5] > 0
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert used["train"]["max_steps"] == 8 and used["optim"]["matrix_lr"] == 0.01


# ---- 2. never a non-finite checkpoint; the guard points at the newest finite one ----------------------
def test_non_finite_state_is_never_checkpointed_and_the_guard_names_the_last_finite_one(tmp_path, cache_dir):
    class PoisonOptimizerState(L.Callback):  # a diverging update: step 4 writes NaN weights, loss 4 is finite
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                for state in trainer.optimizers[0].state.values():
                    for value in state.values():
                        if torch.is_tensor(value) and value.dim() > 0:
                            value.fill_(float("nan"))

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, cache_dir, steps=8, **{"train.ckpt_every": 2, "train.val_every": 0})
    with pytest.raises(NonFiniteStep, match="newest finite checkpoint is .*step-00000002.ckpt"):
        train_in_process(overrides, run_dir, callbacks=[PoisonOptimizerState()])
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "step-00000004.ckpt").exists()  # step 4's weights were NaN: not written
    assert (checkpoints / "last.ckpt").resolve().name == "step-00000002.ckpt"
    good = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert max(train_losses(run_dir)) == 4


# ---- 3. one run per folder ------------------------------------------------------------------------
def test_a_second_run_on_a_held_folder_fails_at_once(tmp_path, cache_dir):
    from lrkv.training.lock import RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(OutputError, match=r"run folder .* is in use by another run \(pid \d+ on "):
            train_in_process(tiny_overrides(tmp_path, cache_dir), run_dir)
    assert not (run_dir / "metrics.csv").exists()


# ---- 4. failed writes: staged beside the target, cleaned up, one line naming the path ---------------
@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "the filesystem is read-only"),
    ],
)
def test_a_failed_write_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, code, words):
    from lrkv.data.utils import staged

    target = tmp_path / "out" / "model.bin"
    with pytest.raises(OutputError, match=f"cannot write {target}: {words}"):
        with staged(target) as tmp:
            assert os.path.dirname(tmp) == str(target.parent)  # beside the target: same filesystem
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(code, os.strerror(code))
    assert os.listdir(target.parent) == []


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_cleaned_up(tmp_path, cache_dir, monkeypatch):
    import lrkv.training.checkpointing as checkpointing

    def disk_full(checkpoint, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "_write_checkpoint", disk_full)
    run_dir = tmp_path / "run"
    with pytest.raises(OutputError, match=r"cannot write .*step-00000002.ckpt: the disk is full"):
        train_in_process(tiny_overrides(tmp_path, cache_dir, steps=2, **{"train.ckpt_every": 2}), run_dir)
    assert os.listdir(run_dir / "checkpoints") == []


def test_an_unwritable_output_folder_is_refused_before_hydra_starts(tmp_path, monkeypatch, capsys):
    from lrkv.cli import precheck, unwritable

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is a file, not a folder" in unwritable(str(a_file / "runs"))
    assert unwritable(str(tmp_path / "new" / "folder")) is None
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert f"permission denied on {tmp_path}" in unwritable(str(tmp_path / "new"))
    with pytest.raises(SystemExit) as e:
        precheck([f"paths.output_dir={tmp_path / 'new'}"], "train")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: cannot write the output folder {tmp_path / 'new'}")


# ---- 5. the umask decides who can read outputs and the shared cache ----------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    from lrkv import ModelConfig
    from lrkv.data.tokenizer import train_bpe
    from lrkv.data.utils import atomic_write
    from lrkv.model import Transformer
    from lrkv.training.checkpoint import save_pretrained
    from lrkv.training.checkpointing import AtomicCheckpointIO
    from lrkv.training.lock import RunLock

    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "summary.json"), "{}")
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "step.ckpt")
        tokenizer = train_bpe(["some text for a tokenizer"] * 4, 260)
        tokenizer.save(str(tmp_path / "tokenizer.json"))  # the shared tokenizer cache writes the same way
        cfg = ModelConfig(name="t", attention="mha", n_layer=1, n_head=2, d_model=32, head_dim=16, vocab_size=64)
        save_pretrained(Transformer(cfg), tmp_path / "pretrained", tokenizer)
        RunLock(tmp_path).acquire().release()
    finally:
        os.umask(old)
    files = ["summary.json", "step.ckpt", "tokenizer.json", ".lock"]
    files += [f"pretrained/{n}" for n in ("model.safetensors", "model_config.json", "tokenizer.json")]
    for name in files:
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ---- 6. every number is checked up front --------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.matrix_lr=-0.01", "optim.matrix_lr=-0.01 is out of range: it must be > 0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1 is out of range"),
        ("optim.betas=[0.9,1.5]", "optim.betas="),
        ("optim.grad_clip=abc", "optim.grad_clip='abc' must be a number"),
        ("train.batch_tokens=0", "train.batch_tokens=0 is out of range"),
        ("train.max_steps=2.5", "train.max_steps=2.5 must be an integer"),
        ("train.log_every=0", "train.log_every=0 is out of range"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
        ("train.compile=maybe", "train.compile='maybe' must be true or false"),
        ("data.batch_size=0", "data.batch_size=0 is out of range"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is out of range"),
        ("data.num_workers=-2", "data.num_workers=-2"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100 is out of range"),
        ("trainer.devices=0", "trainer.devices=0 must be"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is unknown"),
        ("seed=-1", "seed=-1 is out of range"),
    ],
)
def test_every_numeric_setting_is_checked_up_front(tmp_path, override, words):
    from lrkv.training.settings import check_settings

    cfg = compose_train(tiny_overrides(tmp_path, tmp_path) + [override])
    with pytest.raises(ConfigError, match=f"^{words}".replace("[", r"\[").replace("(", r"\(")) as e:
        check_settings(cfg)
    assert "\n" not in str(e.value)


def test_suspicious_settings_are_warned_about(tmp_path, caplog):
    from lrkv.training.settings import check_settings, warn_settings, warn_small_tokenizer

    cfg = compose_train(tiny_overrides(tmp_path, tmp_path, steps=6, **{"optim.warmup_steps": 30}))
    check_settings(cfg)  # valid, but:
    with caplog.at_level(logging.WARNING, logger="lrkv"):
        assert warn_settings(cfg, total_steps=6)
        assert warn_small_tokenizer(asked=4096, got=900)
        assert warn_small_tokenizer(asked=512, got=512) is None
    text = caplog.text
    assert "optim.warmup_steps=30 is longer than the run (6 steps)" in text
    assert "the trained tokenizer has 900 tokens, tokenizer.vocab_size asked 4096" in text


# ---- 7. skipped documents are counted ----------------------------------------------------------------
def test_skipped_documents_are_counted_and_nothing_left_fails(tmp_path, caplog):
    from lrkv.data.corpus import CorpusSpec, iter_documents

    rows = [{"text": "first"}, {"body": "no text field"}, {"text": ""}, {"text": 42}, {"text": "second"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = CorpusSpec(source=str(path), val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lrkv"):
        assert list(iter_documents(spec)) == ["first", "second"]
    assert "skipped 3 of 5 documents (1 without the column 'text', 1 empty, 1 undecodable)" in caplog.text

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [{"body": "a"}, {"text": ""}]))
    with pytest.raises(DataError, match=r"all 2 documents were skipped \(1 without the column 'text', 1 empty\)"):
        list(iter_documents(CorpusSpec(source=str(bad), val_fraction=0.0)))


# ---- 9. the console -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_console_is_readable_and_train_log_holds_the_error(tmp_path, cache_dir):
    args = tiny_overrides(tmp_path, cache_dir, steps=3, **{"train.progress_bar": "true", "callbacks": "default"})
    result = run_script(args, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    stamped = [line.split("] - ", 1)[-1] for line in lines]
    repeated = [line for line, n in collections.Counter(stamped).items() if n > 1 and any(c.isalpha() for c in line)]
    assert not [line for line in repeated if "Total Flops" not in line and "params" not in line], repeated
    text = result.stdout + result.stderr
    for noise in ("weights_only", "Epoch 0/", "Tip:", "LeafSpec", "GPU available"):
        assert noise not in text, noise
    assert "3/3" in result.stderr and "step" in result.stderr  # one bar of optimizer steps

    failed = run_script(
        [a for a in args if not a.startswith("run_name=")] + ["run_name=bad", "optim.matrix_lr=-1"], tmp_path
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    last = (tmp_path / "runs" / "bad" / "train.log").read_text().strip().splitlines()[-1]
    assert "error: optim.matrix_lr=-1" in last


def test_stief_and_eigen_attention_report_progress_per_layer_and_rank(caplog):
    from lrkv import ModelConfig
    from lrkv.compress import compress_model
    from lrkv.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(name="m", attention="mha", n_layer=2, n_head=2, d_model=32, head_dim=16, vocab_size=64)
    model = Transformer(cfg)
    rows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    stief = dict(epochs=1, patience=1, batch_k=4, batch_v=4)
    with caplog.at_level(logging.INFO, logger="lrkv"):
        compress_model(model, [rows], method="stief", k_ranks=8, v_ranks=4, stief=stief)
        compress_model(model, [rows], method="eigen", rank_fractions=[0.5])
    for layer in (0, 1):
        assert f"StiefAttention layer {layer}: key rank 8 (1/2)" in caplog.text
        assert f"StiefAttention layer {layer}: value rank 4 (2/2)" in caplog.text
        assert f"EigenAttention layer {layer}: threshold 1 -> key rank" in caplog.text
