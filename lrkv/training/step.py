"""One optimizer step, in order: where each part of a training step happens.

Lightning drives the loop (automatic optimization, gradient accumulation); this module is the one
place that says what happens in a step and in which order, and performs the parts that are ours.
With `accumulate` micro-batches per optimizer step (plan.batch_plan):

1. **Loss** (`LanguageModel.training_step`, each micro-batch): forward, token-mean cross-entropy;
   the step's loss is summed on the device here (`add_micro_batch_loss`: no host sync). Lightning
   divides the returned loss by `accumulate` and runs backward (gradients add up).
2. **Clip and NaN guard** (`clip_and_check`, from `on_before_optimizer_step`, once per step, after
   the last backward): global gradient norm (clipped to `optim.grad_clip`), the step's loss averaged
   over micro-batches (and over ranks), then **the one host sync of the step** reads both numbers.
   A non-finite loss or gradient norm stops the run *before* the update, naming the newest finite
   checkpoint (`NonFiniteStep`); every rank sees the same global values, so all stop together.
3. **Update** (Lightning): optimizer step, learning-rate schedule step, zero_grad.
4. **Step end** (`StepEnd.on_train_batch_end`, at the last micro-batch of the step), in this order:
   a. batch accounting: `trainer.global_step` now counts this step; tokens = step x tokens per step;
   b. metrics (`TrainMonitor.on_step`): the step's loss and gradient norm, already on the host,
      averaged over `train.log_every` steps into metrics.csv and the loggers; the progress bar;
   c. checkpoint (`PeriodicCheckpoint.on_step`) every `train.ckpt_every` steps, only if the weights
      and optimizer state are finite;
   d. stop (`GracefulStop.on_step`) after SIGTERM / Ctrl-C: save, then raise TrainingInterrupted;
   e. last step: ask Lightning to validate once more when `train.val_every` did not land on it, so
      that every run ends with a validation (summary.json's final_val_loss).
5. **Validation** (Lightning, after step end, every `train.val_every` steps and at the last step).

The loss is averaged where it is computed (steps 1-2): the monitor receives one finished number per
step and never rescales Lightning's accumulation-divided loss.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from lrkv.errors import LrkvError


class NonFiniteStep(LrkvError):
    """The NaN guard: a non-finite loss or gradient norm stopped the run before the update."""


def at_step_boundary(trainer, batch_idx: int) -> bool:
    """True at the last micro-batch of an optimizer step (after which global_step has advanced)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def add_micro_batch_loss(module, loss: torch.Tensor) -> None:
    """Step 1: sum the micro-batch losses of this optimizer step on the device (no sync)."""
    loss = loss.detach().float()
    module.step_loss_sum = loss if module.step_loss_sum is None else module.step_loss_sum + loss
    module.step_micro_batches += 1


def clip_and_check(module, clip: float | None) -> tuple[float, float]:
    """Step 2: clip the gradients, average the step's loss, read (loss, grad norm) in one host sync.

    Raises NonFiniteStep when either is non-finite (before the optimizer has touched the weights).
    """
    trainer = module.trainer
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor (the global norm; a collective, not a host sync)
        norm = norm.full_tensor()
    loss = module.step_loss_sum / max(1, module.step_micro_batches)
    if trainer.world_size > 1:  # mean over ranks (sum then divide: gloo's AVG is unreliable)
        loss = trainer.strategy.reduce(loss, reduce_op="sum") / trainer.world_size
    loss_value, norm_value = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()  # the one sync
    module.step_loss_sum, module.step_micro_batches = None, 0
    module.last_loss, module.last_grad_norm = loss_value, norm_value
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"training loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {norm_value}"
        raise NonFiniteStep(
            f"{what} at step {trainer.global_step}; stopped before the update, {newest_finite_checkpoint(trainer)} "
            "(lower optim learning rates or raise warmup, then resume with ckpt_path=last)"
        )
    return loss_value, norm_value


def newest_finite_checkpoint(trainer) -> str:
    """Where the NaN guard points: last.ckpt always is the newest finite checkpoint (see checkpointing)."""
    from lrkv.training.checkpointing import PeriodicCheckpoint, resolve_last

    saver = next((c for c in trainer.callbacks if isinstance(c, PeriodicCheckpoint)), None)
    last = resolve_last(saver.dirpath) if saver is not None else None
    if last is None:
        return "and there is no finite checkpoint of this run to resume from"
    return f"the newest finite checkpoint is {last}"


class StepEnd(L.Callback):
    """Step 4: at the end of each optimizer step, in order: metrics, checkpoint, stop, final validation."""

    def __init__(self, monitor, checkpoint, stop, val_every: int, has_validation: bool):
        self.monitor, self.checkpoint, self.stop = monitor, checkpoint, stop
        self.val_every, self.has_validation = val_every, has_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not at_step_boundary(trainer, batch_idx):
            return
        step = trainer.global_step  # a. this step is counted
        self.monitor.on_step(trainer, pl_module)  # b. metrics and progress
        self.checkpoint.on_step(trainer)  # c. checkpoint when due (finite only)
        self.stop.on_step(trainer)  # d. SIGTERM / Ctrl-C: save and stop
        if step >= trainer.max_steps and self.has_validation and (not self.val_every or step % self.val_every):
            trainer.should_stop = True  # e. Lightning validates before stopping (final validation)
