"""Checkpoints that a crash, Ctrl-C or SIGTERM never corrupt.

Every checkpoint is written under a temporary name and renamed into place (a file for one process,
a folder of shards under FSDP); `checkpoints/last.ckpt` is a symlink switched atomically to the
newest complete one, and older checkpoints are pruned only after that. `ckpt_path=last` follows it.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from lrkv.errors import TrainingInterrupted
from lrkv.io.checkpoints import LAST, resolve_last


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary checkpoint to its final name (replacing an older one of that name)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then os.replace."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        _atomic_save(checkpoint, tmp)
        _publish(tmp, path)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 strategy whose sharded checkpoint folders appear only when every rank has written."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = _tmp_name(path)
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            _publish(tmp, path)
        self.barrier()


class PeriodicCheckpoint(L.Callback):
    """Save `step-XXXXXXXX.ckpt` every `every_n_steps` optimizer steps and at the end; keep the newest `keep`."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 500, keep: int = 2):
        self.dirpath, self.every_n_steps, self.keep = Path(dirpath), every_n_steps, max(1, keep)
        self.last_saved_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and step > 0
            and self._at_step_boundary(trainer, batch_idx)
        ):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    @staticmethod
    def _at_step_boundary(trainer, batch_idx: int) -> bool:
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0

    def save(self, trainer) -> Path | None:
        step = trainer.global_step
        if step == self.last_saved_step or step == 0:
            return None
        path = self.dirpath / f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(path)  # atomic: AtomicCheckpointIO / AtomicModelParallelStrategy
        if trainer.is_global_zero:
            link, tmp = self.dirpath / LAST, self.dirpath / f".{LAST}.tmp"
            _remove(tmp)
            os.symlink(path.name, tmp)
            os.replace(tmp, link)
            self._prune(keep_also=path)
        trainer.strategy.barrier()
        self.last_saved_step = step
        return path

    def _prune(self, keep_also: Path) -> None:
        checkpoints = sorted(p for p in self.dirpath.glob("step-*.ckpt"))
        for old in checkpoints[: -self.keep]:
            if old != keep_also:
                _remove(old)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)


class GracefulStop(L.Callback):
    """On SIGTERM or the first SIGINT (Ctrl-C): finish the optimizer step, save a checkpoint, stop.

    Stopping raises TrainingInterrupted (no validation, export or summary: the run is not finished),
    which the entry point reports in one line.

    A second SIGINT interrupts at once (the last complete checkpoint stays intact). All ranks decide
    together, so a signal delivered to one process stops every process at the same step.
    """

    def __init__(self, checkpoint: PeriodicCheckpoint):
        self.checkpoint = checkpoint
        self.requested: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not PeriodicCheckpoint._at_step_boundary(trainer, batch_idx):
            return
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            path = self.checkpoint.save(trainer) or resolve_last(self.checkpoint.dirpath)
            signal_name = self.requested or "a signal on another rank"
            raise TrainingInterrupted(
                f"{signal_name} at step {trainer.global_step}: checkpoint saved to {path}; resume with ckpt_path=last "
                "(and the same run_name)",
                signal_name,
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self.restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
