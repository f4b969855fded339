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

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets. Matched against
# torch.cuda.get_device_name() in this order, first match wins, so that the specific variants (PCIe, NVL)
# come before the family name: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and
# "NVIDIA H100 NVL" are not.
PEAK_BF16_FLOPS = [
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),  # the 94 GB NVL card: 1671 TFLOP/s with sparsity
    ("H100", 989e12),  # SXM5 (HBM3 / HBM3e)
    ("H800 PCIE", 756e12),
    ("H800", 989e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops_for_name(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU from its CUDA device name, or None when unknown."""
    upper = name.upper()
    for key, value in PEAK_BF16_FLOPS:
        if key in upper:
            return value
    return None


def device_peak_flops(device: torch.device, configured: float | None = None) -> float | None:
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: flops_per_token x tokens/s / (peak FLOP/s per device x devices); None without a peak.

    The one formula behind metrics.csv's `mfu` and the benchmarks' (flops_per_token from
    Transformer.flops_per_token(seq_len)).
    """
    return flops_per_token * tokens_per_s / (peak_flops * devices) if peak_flops else None


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
    """Every `log_every` optimizer steps (and at the last step): loss (mean over the steps since the last
    row; each step's loss is already the mean over ranks and micro-batches, see training/step.py), lr,
    grad norm, tokens seen, tokens/s, MFU, peak memory; validation loss and bits-per-byte after each
    validation. Also drives the progress bar (one bar of optimizer steps, rank 0).

    Nothing here synchronises with the device: the step's loss and gradient norm arrive as numbers from
    the step's one host sync (step.clip_and_check). tokens/s is measured between rows.

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
        progress_bar: bool = False,
    ):
        self.run_dir, self.log_every = Path(run_dir), max(1, log_every)
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.kv_bytes_per_token, self.params = kv_bytes_per_token, params
        self.configured_peak, self.resume = peak_flops, resume
        self.csv: MetricsCSV | None = None
        self.history: list[dict] = []
        self._losses: list[float] = []
        self._t0 = None
        self._step0 = 0
        self.show_progress = progress_bar
        self.progress: StepProgress | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = device_peak_flops(pl_module.device, self.configured_peak)
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            extra = datamodule.metric_columns() if hasattr(datamodule, "metric_columns") else []
            self.csv = MetricsCSV(self.run_dir / "metrics.csv", resume=self.resume, columns=COLUMNS + extra)
            if self.resume:
                self.csv.truncate_after(trainer.global_step)
            if self.show_progress:
                self.progress = StepProgress(trainer.max_steps, trainer.global_step, self.tokens_per_step)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.csv is not None:
            self.csv.close()
            self.csv = None

    # ---- training (called by step.StepEnd at the end of each optimizer step) -------------------
    def on_step(self, trainer, pl_module) -> None:
        step = trainer.global_step
        self._losses.append(pl_module.last_loss)
        if self.progress is not None:
            self.progress.update(step, pl_module.last_loss)
        if step % self.log_every and step < trainer.max_steps:
            return
        now = time.perf_counter()
        tokens_per_s = (step - self._step0) * self.tokens_per_step / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        train_loss = sum(self._losses) / len(self._losses)
        self._losses = []
        optimizer = trainer.optimizers[0]
        row = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": pl_module.last_grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak, trainer.world_size),
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
        if self.progress is not None:
            self.progress.validated(metrics["val_loss"])
        pl_module.val_metrics = None
        self._t0 = time.perf_counter()  # validation time is not training throughput

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


class StepProgress:
    """One progress bar of optimizer steps (not micro-batches): tokens/s, loss, val loss, ETA (tqdm)."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
        import sys

        from tqdm.auto import tqdm

        self.tokens_per_step, self.start_step, self.t0 = tokens_per_step, start_step, time.perf_counter()
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            desc="train",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30.0,
            file=sys.stderr,
        )
        self.postfix: dict[str, str] = {}

    def update(self, step: int, loss: float | None) -> None:
        self.bar.update(step - self.bar.n)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.postfix["loss"] = f"{loss:.4f}" if loss is not None else "-"
        self.postfix["tok/s"] = f"{(step - self.start_step) * self.tokens_per_step / elapsed:,.0f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def validated(self, val_loss: float) -> None:
        """Show the new validation loss now (the last step's validation comes after its update)."""
        self.postfix["val"] = f"{val_loss:.4f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    """PNG of train and validation loss vs optimizer steps."""
    try:
        import matplotlib
    except ImportError:  # a minimal image (e.g. a bare GPU machine): metrics.csv has the numbers
        print(f"matplotlib is not installed: {path.name} not drawn")
        return
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
