"""Training telemetry: metrics.csv, Lightning loggers (wandb...), throughput, MFU, memory, summary, plot.

metrics.csv (always, in the run folder) has one row per logging event with the columns in
`COLUMNS`; an empty cell means "not logged in this row" (validation rows carry val_loss/val_bpb).

MFU = model FLOPs per token (Transformer.flops_per_token: 6 N_matmul + attention, causal counted in
full, as torchtitan does) x tokens/s / (peak FLOP/s x number of devices). The peak is the device's
dense bf16 peak looked up by name, or `train.peak_flops` when set; unknown (CPU) leaves MFU empty.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
from pathlib import Path

import lightning as L
import torch

COLUMNS = [
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_mem_gib",
    "kv_bytes_per_token",
    "params",
]

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peaks, FLOP/s
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def device_peak_flops(device: torch.device, configured: float | None = None) -> float | None:
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)


class MetricsCSV:
    """Append rows to a CSV with fixed columns, flushing every row (a crash keeps what was logged)."""

    def __init__(self, path: Path, resume: bool, columns: list[str] | None = None):
        self.path, self.columns = path, columns or COLUMNS
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not (resume and path.exists())
        self.file = open(path, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns)
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        self.file.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint's step (they will be logged again)."""
        self.file.close()
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["step"] and int(r["step"]) <= step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns)
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow(r)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


class TrainMonitor(L.Callback):
    """Every `log_every` optimizer steps: loss (mean over ranks and micro-batches), lr, grad norm,
    tokens seen, tokens/s, MFU, peak memory; validation loss and bits-per-byte after each validation.

    tokens_per_step: global tokens per optimizer step. flops_per_token: for MFU.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        log_every: int,
        tokens_per_step: int,
        flops_per_token: float,
        kv_bytes_per_token: int,
        params: int,
        peak_flops: float | None = None,
        resume: bool = False,
    ):
        self.run_dir, self.log_every = Path(run_dir), max(1, log_every)
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.kv_bytes_per_token, self.params = kv_bytes_per_token, params
        self.configured_peak, self.resume = peak_flops, resume
        self.csv: MetricsCSV | None = None
        self.history: list[dict] = []
        self._loss_sum, self._loss_count = 0.0, 0
        self._t0 = None
        self._step0 = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = device_peak_flops(pl_module.device, self.configured_peak)
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            extra = datamodule.metric_columns() if hasattr(datamodule, "metric_columns") else []
            self.csv = MetricsCSV(self.run_dir / "metrics.csv", resume=self.resume, columns=COLUMNS + extra)
            if self.resume:
                self.csv.truncate_after(trainer.global_step)
        self._sync(pl_module)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        self._start_time = self._t0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.csv is not None:
            self.csv.close()
            self.csv = None

    # ---- training -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._loss_sum = self._loss_sum + loss.detach().double() * trainer.accumulate_grad_batches  # (unscaled)
        self._loss_count += 1
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if step % self.log_every:
            return
        mean_loss = torch.stack(
            [
                torch.as_tensor(self._loss_sum, dtype=torch.float64, device=pl_module.device),
                torch.tensor(float(self._loss_count), dtype=torch.float64, device=pl_module.device),
            ]
        )
        if trainer.world_size > 1:
            mean_loss = trainer.strategy.reduce(mean_loss, reduce_op="sum")
        self._loss_sum, self._loss_count = 0.0, 0
        self._sync(pl_module)
        now = time.perf_counter()
        tokens_per_s = (step - self._step0) * self.tokens_per_step / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        optimizer = trainer.optimizers[0]
        row = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "train_loss": float(mean_loss[0] / mean_loss[1]),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": pl_module.last_grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": (self.flops_per_token * tokens_per_s / (self.peak * trainer.world_size)) if self.peak else None,
            "peak_mem_gib": peak_memory_gib(pl_module.device),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "params": self.params,
        }
        if hasattr(getattr(trainer, "datamodule", None), "train_metrics"):
            row.update(trainer.datamodule.train_metrics())  # data=mixture: tokens/<name>
        self._emit(trainer, row)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = getattr(pl_module, "val_metrics", None)
        if trainer.sanity_checking or not metrics:
            return
        step = trainer.global_step
        self._emit(trainer, {"step": step, "tokens": step * self.tokens_per_step, **metrics})
        pl_module.val_metrics = None

    # ---- helpers ------------------------------------------------------------------------------
    def _emit(self, trainer, row: dict) -> None:
        self.history.append(row)
        if not trainer.is_global_zero:
            return
        if self.csv is not None:
            self.csv.write(row)
        numbers = {k: v for k, v in row.items() if k != "step" and v is not None and not isinstance(v, str)}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=row["step"])

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows with numbers parsed (empty cells dropped)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
    return rows


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    """PNG of train and validation loss vs optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(run_dir: Path, summary: dict) -> None:
    from lrkv.data.utils import atomic_write

    atomic_write(str(run_dir / "summary.json"), json.dumps(summary, indent=2))
