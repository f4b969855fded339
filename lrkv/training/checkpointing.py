"""Checkpoints that a crash, Ctrl-C, SIGTERM or a diverging run never corrupt.

Every checkpoint is written under a temporary name beside its final one and renamed into place
(`lrkv.data.utils.staged`: a file for one process; a folder of shards under FSDP, published by rank 0
when every rank has written); `checkpoints/last.ckpt` is a symlink switched atomically to the newest
complete one, and older checkpoints are pruned only after that. `ckpt_path=last` follows it.

A checkpoint is written only when the weights and the optimizer state are all finite, so last.ckpt
is always the newest finite checkpoint, the one the NaN guard (training/step.py) points at.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from lrkv.data.utils import raise_write_error, remove, staged, staging_name
from lrkv.errors import TrainingInterrupted
from lrkv.io.checkpoints import LAST, resolve_last

log = logging.getLogger("lrkv")


def _write_checkpoint(checkpoint: dict, path: str) -> None:
    torch.save(checkpoint, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, then os.replace (lrkv.data.utils.staged)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with staged(path) as tmp:
            _write_checkpoint(checkpoint, tmp)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 strategy whose sharded checkpoint folders appear only when every rank has written."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(staging_name(path)))
        if self.global_rank == 0:
            remove(tmp)
        self.barrier()
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except BaseException as e:
            remove(tmp)
            raise_write_error(e, path)
        self.barrier()
        if self.global_rank == 0:
            try:
                if path.is_dir() and not path.is_symlink():
                    remove(path)
                os.replace(tmp, path)
            except OSError as e:
                remove(tmp)
                raise_write_error(e, path)
        self.barrier()


def all_finite(trainer, pl_module) -> bool:
    """Weights and optimizer state all finite (this rank's shards; every rank agrees on the answer)."""
    tensors = [p.detach() for p in pl_module.parameters()]
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    finite = bool(torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all()) if local else True
    if trainer.world_size > 1:
        finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
    return finite


class PeriodicCheckpoint(L.Callback):
    """Save `step-XXXXXXXX.ckpt` every `every_n_steps` optimizer steps and at the end; keep the newest `keep`."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 500, keep: int = 2):
        self.dirpath, self.every_n_steps, self.keep = Path(dirpath), every_n_steps, max(1, keep)
        self.last_saved_step = -1

    def on_step(self, trainer) -> None:
        """At the end of an optimizer step (step.StepEnd): save every `every_n_steps` steps."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer) -> Path | None:
        step = trainer.global_step
        if step == self.last_saved_step or step == 0:
            return None
        if not all_finite(trainer, trainer.lightning_module):
            log.warning(
                f"step {step}: the weights or optimizer state are not finite; no checkpoint written "
                f"(last.ckpt stays at {resolve_last(self.dirpath)})"
            )
            return None
        path = self.dirpath / f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # atomic: AtomicCheckpointIO / AtomicModelParallelStrategy
        if trainer.is_global_zero:
            link = self.dirpath / LAST
            with staged(link) as tmp:
                os.symlink(path.name, tmp)
            self._prune(keep_also=path)
        trainer.strategy.barrier()
        self.last_saved_step = step
        return path

    def _prune(self, keep_also: Path) -> None:
        checkpoints = sorted(p for p in self.dirpath.glob("step-*.ckpt"))
        for old in checkpoints[: -self.keep]:
            if old != keep_also:
                remove(old)

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

    def on_step(self, trainer) -> None:
        """At the end of an optimizer step (step.StepEnd), after the periodic checkpoint."""
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
