"""Training throughput of every attention kind, and the framework's overhead over a bare loop.

    python bench/train_step.py --tiny                          # CPU, seconds: proves it runs
    python bench/train_step.py --size 1b --layers 8 --batch 8 --seq 2048 --compile --save   # GPU, paper width

Kinds: mha, gqa, mqa, mla, lrkv (factored: X.[W_shared|U] then batched .B^T) and lrkv_folded
(W_shared + U B^T formed each step, then one MHA-sized GEMM). Per kind, two measurements on the
same model, batch and kind of optimizer (MuonAdamW, the paper's split), in the same process:

- bare: a plain loop (forward + backward under bf16 autocast on CUDA, gradient clipping, optimizer
  and schedule step), `tokens_per_s`, `vs_mha` (against MHA measured in the same process), `mfu`;
- framework: the real LightningModule step (lrkv.training.module.LanguageModel under a Lightning
  Trainer with the project's callbacks: TrainMonitor writing metrics.csv, PeriodicCheckpoint,
  GracefulStop) fed the same batch from memory: `framework_tokens_per_s` and `framework_vs_bare`.
  `mfu_logged` is the MFU that TrainMonitor wrote to metrics.csv over the timed steps, to compare
  with the benchmark's `framework_mfu` (one formula: lrkv.training.monitor.mfu).

MFU = Transformer.flops_per_token(seq) x tokens/s / device bf16 peak (lrkv/training/monitor.py);
--peak-flops sets the peak (e.g. on a CPU, where none is known). --layers overrides the preset's
depth (same width). Both loops are timed over --iters steps after --warmup steps (rounded up to a
multiple of --iters), synchronised only at the ends; --rounds alternates bare and framework runs and
keeps each one's fastest.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings

import torch

from lrkv import Transformer, load_model_config
from lrkv.training.monitor import device_peak_flops, mfu
from lrkv.training.optim import build_optimizer, lr_factor

try:
    from bench.common import add_ratios, parser, pick_device, print_table, record, sync, timed_loop
except ImportError:  # run as a script: python bench/train_step.py
    from common import add_ratios, parser, pick_device, print_table, record, sync, timed_loop

KINDS = ["mha", "gqa", "mqa", "mla", "lrkv", "lrkv_folded"]
OPTIM = dict(
    name="muon",
    matrix_lr=0.02,
    embed_lr=0.2,
    head_lr=0.004,
    scalar_lr=0.004,
    betas=[0.9, 0.95],
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.95,
    grad_clip=1.0,
    schedule="constant",
    warmup_steps=0,
)


def model_for(kind: str, size: str, layers: int | None, seq: int, width: int | None = None):
    name = "lrkv" if kind == "lrkv_folded" else kind
    overrides = {"max_seq_len": max(seq, 64)}
    if layers:
        overrides["n_layer"] = layers
    if width:  # same number of heads, head_dim = width / heads
        heads = load_model_config(f"{name}_{size}").n_head
        overrides.update(d_model=width, head_dim=width // heads)
    if kind == "lrkv_folded":
        overrides["lrkv_impl"] = "folded"
    return load_model_config(f"{name}_{size}", **overrides)


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def warmup_steps(args) -> int:
    """Warm-up steps of both loops: --warmup rounded up to a multiple of --iters (the framework's metrics rows
    then end exactly at the timed window), the same for both so that neither is timed colder."""
    return -(-max(args.warmup, 1) // args.iters) * args.iters


def bare_loop(model, x, device, args) -> float:
    """Seconds per optimizer step of a plain training loop."""
    optimizer = build_optimizer(model, OPTIM)
    schedule = dict(schedule="constant", warmup_steps=0, total_steps=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with autocast_for(device):
            loss = model.loss(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return timed_loop(step, device, warmup=warmup_steps(args), iters=args.iters)


class _StepTimer:
    """Lightning callback: wall time of optimizer steps [start, stop), synchronised at both ends."""

    def __init__(self, device, start: int, stop: int):
        import lightning as L

        class Timer(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                if batch_idx == start:
                    sync(device)
                    self.t0 = _now()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == stop - 1:
                    sync(device)
                    self.t1 = _now()

        self.callback = Timer()
        self.steps = stop - start

    @property
    def seconds_per_step(self) -> float:
        return (self.t1 - self.t0) / self.steps


def _now() -> float:
    import time

    return time.perf_counter()


class SameBatch:
    """An in-memory "data loader": the same batch `steps` times (already on the device)."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


def framework_loop(model, x, device, args, peak: float | None) -> tuple[float, float | None]:
    """Seconds per optimizer step of LanguageModel under a Lightning Trainer, and the MFU TrainMonitor logged.

    The Trainer gets the project's callbacks; the timed steps are the last --iters ones, and TrainMonitor
    logs every --iters steps, so its last row covers exactly the timed steps.
    """
    import lightning as L

    from lrkv.training.checkpointing import GracefulStop, PeriodicCheckpoint
    from lrkv.training.module import LanguageModel
    from lrkv.training.step import StepEnd

    iters = args.iters
    warmup = warmup_steps(args)
    steps = warmup + iters
    module = LanguageModel(model=model.cfg.to_dict(), optim=OPTIM, total_steps=steps)
    module.model = model  # the same model object (compiled blocks included): configure_model keeps it
    batch = {"input": x, "target": x}
    timer = _StepTimer(device, warmup, steps)
    with tempfile.TemporaryDirectory() as run_dir:
        from lrkv.training.monitor import TrainMonitor

        monitor = TrainMonitor(
            run_dir,
            log_every=iters,
            tokens_per_step=x.numel(),
            flops_per_token=model.flops_per_token(x.shape[1]),
            kv_bytes_per_token=0,
            params=model.num_params(),
            peak_flops=peak,
        )
        checkpoint = PeriodicCheckpoint(f"{run_dir}/checkpoints", every_n_steps=0)
        checkpoint.last_saved_step = steps  # no checkpoint at the end: the run is a throwaway
        stop = GracefulStop(checkpoint)
        step_end = StepEnd(monitor, checkpoint, stop, val_every=0, has_validation=False)  # as train.py orders a step
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            callbacks=[step_end, monitor, checkpoint, stop, timer.callback],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=run_dir,
            use_distributed_sampler=False,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|isinstance).*")
            trainer.fit(module, train_dataloaders=SameBatch(batch, steps))
    logged = monitor.history[-1].get("mfu") if monitor.history else None
    return timer.seconds_per_step, logged


def bench_kind(kind, args, device) -> dict:
    cfg = model_for(kind, args.size, args.layers, args.seq, args.width)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if args.compile:
        for block in model.blocks:
            block.compile()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    peak = device_peak_flops(device, args.peak_flops)
    tokens = args.batch * args.seq
    flops = model.flops_per_token(args.seq)
    bare, framework, logged = float("inf"), float("inf"), None
    for _ in range(args.rounds):
        bare = min(bare, bare_loop(model, x, device, args))
        if args.framework:
            seconds, logged = framework_loop(model, x, device, args, peak)
            framework = min(framework, seconds)
    row = {
        "kind": kind,
        "params_M": model.num_params() / 1e6,
        "ms_per_step": bare * 1e3,
        "tokens_per_s": tokens / bare,
        "mfu": mfu(flops, tokens / bare, peak),
    }
    if args.framework:
        row.update(
            framework_tokens_per_s=tokens / framework,
            framework_vs_bare=bare / framework,
            framework_mfu=mfu(flops, tokens / framework, peak),
            mfu_logged=logged,
        )
    if device.type == "cuda":
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    p = parser(__doc__, KINDS, iters=10, tiny_help="CPU smoke size: tiny presets, 2 layers, batch 2 x 64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--width", type=int, default=None, help="override d_model (same heads; head_dim = width / heads)")
    p.add_argument("--rounds", type=int, default=1, help="alternate bare and framework runs, keep each one's best")
    p.add_argument("--no-framework", dest="framework", action="store_false", help="skip the Lightning step")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: by name)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.layers, args.batch, args.seq, args.warmup, args.iters = "tiny", 2, 2, 64, 1, 2
    device = pick_device(args.device)
    rows = [bench_kind(kind, args, device) for kind in args.kinds.split(",")]
    add_ratios(rows, vs_mha=("tokens_per_s", True))
    columns = ["kind", "params_M", "ms_per_step", "tokens_per_s", "vs_mha", "mfu"]
    if args.framework:
        columns += ["framework_tokens_per_s", "framework_vs_bare", "framework_mfu", "mfu_logged"]
    print_table(rows, columns + (["peak_mem_GiB"] if device.type == "cuda" else []))
    return record("train_step", device, rows, vars(args), args.save)


if __name__ == "__main__":
    main()
