"""One training run from a plain config dict (what train.py gets from Hydra).

    summary = train(cfg, run_dir)

Steps: settings checked (training/settings.py) -> the run folder locked (training/lock.py) -> data
module (tokenizer first, so the vocabulary can follow it) -> model config -> global batch arithmetic
(gradient accumulation so that the global batch is `train.batch_tokens`) -> resume rules when
resuming -> Trainer (single device, DDP or FSDP2) with our callbacks -> fit (one optimizer step is
described in training/step.py) -> export `pretrained/`, `summary.json`, `loss.png`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

from lrkv.config import ModelConfig
from lrkv.data.datamodule import LMDataModule
from lrkv.data.tokenizer import padded_vocab_size
from lrkv.errors import CheckpointError, ConfigError
from lrkv.io.checkpoints import read_metadata, resolve_last
from lrkv.io.runs import read_metrics
from lrkv.measure import kv_cache_bytes
from lrkv.model import Transformer
from lrkv.training import plan
from lrkv.training.checkpoint import save_pretrained
from lrkv.training.checkpointing import (
    AtomicCheckpointIO,
    AtomicModelParallelStrategy,
    GracefulStop,
    PeriodicCheckpoint,
)
from lrkv.training.lock import RunLock, process_rank
from lrkv.training.module import LanguageModel
from lrkv.training.monitor import TrainMonitor, plot_losses, write_summary
from lrkv.training.plan import batch_plan, world_size_of
from lrkv.training.settings import check_settings, resume_rules, warn_settings, warn_small_tokenizer
from lrkv.training.step import StepEnd


# ---- pieces ---------------------------------------------------------------------------------------
def make_datamodule(cfg: dict) -> LMDataModule:
    data, tok = dict(cfg["data"]), dict(cfg.get("tokenizer") or {})
    trainer_cfg = cfg.get("trainer") or {}
    on_cuda = trainer_cfg.get("accelerator", "auto") not in ("cpu",) and torch.cuda.is_available()
    data.setdefault("pin_memory", on_cuda)  # pinned batches: non-blocking host-to-device copies
    tokenizer = tok.get("path") or "bpe"
    if tok.get("kind", "bpe") != "bpe" and not tok.get("path"):
        raise ConfigError(
            f"tokenizer={tok.get('kind')} needs tokenizer.path=DIR_OR_FILE (tokenizer.json or vocab.json + merges.txt)"
        )
    return LMDataModule(
        **data,
        tokenizer=tokenizer,
        vocab_size=int(tok.get("vocab_size", 4096)),
        tokenizer_max_chars=tok.get("max_chars"),
        seed=int(cfg["seed"]),
    )


def make_strategy(trainer_cfg: dict, world: int):
    name = trainer_cfg.get("strategy", "auto")
    accelerator = trainer_cfg.get("accelerator", "auto")
    if name == "fsdp":
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "trainer=fsdp needs CUDA GPUs and none is visible; use trainer=cpu_fsdp to try FSDP on CPU"
            )
        return AtomicModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1), []
    if name in ("auto", "ddp"):
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu")
        return name, [AtomicCheckpointIO()]
    raise ConfigError(f"trainer.strategy={name!r} is unknown; use auto, ddp or fsdp")


def resolve_precision(trainer_cfg: dict) -> tuple[str, str | None]:
    """Lightning precision and the FSDP parameter dtype for `trainer.precision` (auto: bf16 on CUDA, fp32 on CPU)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    accelerator = trainer_cfg.get("accelerator", "auto")
    on_gpu = accelerator not in ("cpu",) and torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "32-true"
    if trainer_cfg.get("strategy") == "fsdp" and precision == "bf16-mixed":
        return "32-true", "bf16"  # FSDP2 MixedPrecisionPolicy: bf16 compute, fp32 master weights and reductions
    return precision, None


def resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> Path | None:
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = resolve_last(run_dir / "checkpoints")
        if last is None:
            print(f"ckpt_path=last: no checkpoint in {run_dir / 'checkpoints'} yet, starting from scratch")
        return last
    path = Path(ckpt_path)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run folder
        last = resolve_last(path / "checkpoints")
        if last is None:
            raise CheckpointError(
                f"run folder {path} has no checkpoint in checkpoints/; "
                "pass a checkpoint file or start without ckpt_path"
            )
        return last
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; use ckpt_path=last, a run folder or a .ckpt path")
    return path


def check_checkpoint_model(path: Path, model_cfg: ModelConfig) -> None:
    """Refuse, in one line, a checkpoint trained with another model shape."""
    saved = (read_metadata(path).get("hyper_parameters") or {}).get("model")
    if not saved:
        return
    ours = model_cfg.to_dict()
    different = [k for k in ours if k in saved and saved[k] != ours[k] and k != "name"]
    if different:
        k = different[0]
        raise CheckpointError(
            f"checkpoint {path} was trained with model.{k}={saved[k]!r}, this run has {ours[k]!r}; "
            f"resume with the same model config (model={saved.get('name')})"
        )


# ---- the console ----------------------------------------------------------------------------------
LIGHTNING_NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "Tip:",
    "`Trainer(limit_val_batches",
    "`Trainer.fit` stopped",
    "`weights_only` was not set",
    "LOCAL_RANK:",
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in LIGHTNING_NOISE)


def configure_console() -> None:
    """One line per message, and only messages a user can act on.

    Under Hydra the root logger prints (and writes train.log), so Lightning's own handler would print
    every line twice: it is removed and Lightning's records go through the root. Lightning's banners
    (accelerator availability, tips, "fit stopped", checkpoint-format notes) are filtered out.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if root.handlers:  # Hydra's console + train.log handlers print Lightning's records once
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        handlers += logger.handlers
    for handler in handlers:
        if not any(isinstance(f, _Quiet) for f in handler.filters):
            handler.addFilter(_Quiet())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")  # ours, on purpose


def init_source(cfg: dict):
    """The pretrained model named by train.init_from (weights only: fresh optimizer and schedule), or None."""
    path = (cfg.get("train") or {}).get("init_from")
    if not path:
        return None
    from lrkv.training.init_from import load_init_source

    return load_init_source(path)


# ---- the run --------------------------------------------------------------------------------------
def train(cfg: dict, run_dir: str | Path, extra_callbacks: list | None = None, loggers: list | None = None) -> dict:
    """Check the settings, hold the run folder (rank 0), train; see the module docstring."""
    run_dir = Path(run_dir)
    check_settings(cfg)
    if (cfg.get("train") or {}).get("dry_run"):  # parameters, batch arithmetic, memory plan; no data, no GPU, no lock
        return plan.dry_run(cfg)
    configure_console()
    lock = RunLock(run_dir) if process_rank() == 0 else None
    if lock is not None:
        try:
            lock.acquire()
        except OSError as e:
            from lrkv.data.utils import raise_write_error

            raise_write_error(e, run_dir)
    try:
        return _train(cfg, run_dir, extra_callbacks, loggers)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: dict, run_dir: Path, extra_callbacks: list | None, loggers: list | None) -> dict:
    train_cfg, trainer_cfg = dict(cfg["train"]), dict(cfg["trainer"])
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)

    world = world_size_of(trainer_cfg)
    strategy, plugins = make_strategy(trainer_cfg, world)  # hardware errors first, before any data work
    precision, fsdp_dtype = resolve_precision(trainer_cfg)
    init = init_source(cfg)  # train.init_from: the source model (its tokenizer unless tokenizer.path is set)
    if init is not None and not (cfg.get("tokenizer") or {}).get("path"):
        from lrkv.training.init_from import tokenizer_path

        cfg = {**cfg, "tokenizer": {**(cfg.get("tokenizer") or {}), "path": tokenizer_path(init)}}
    datamodule = make_datamodule(cfg)
    tokenizer = datamodule.load_tokenizer()
    tok_cfg = cfg.get("tokenizer") or {}
    if tok_cfg.get("kind", "bpe") == "bpe" and not tok_cfg.get("path") and process_rank() == 0:
        warn_small_tokenizer(int(tok_cfg.get("vocab_size", 4096)), tokenizer.vocab_size)
    model_fields = dict(cfg["model"])
    if train_cfg.get("vocab_from_tokenizer", True):
        model_fields["vocab_size"] = padded_vocab_size(tokenizer.vocab_size)
    elif model_fields.get("vocab_size", 0) < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_fields.get('vocab_size')} < tokenizer vocabulary {tokenizer.vocab_size}; "
            "raise it or set train.vocab_from_tokenizer=true"
        )
    model_cfg = ModelConfig.from_dict(model_fields)
    seq_len = int(datamodule.hparams.seq_len)
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; lower data.seq_len"
        )

    accumulate, batch_tokens, total_steps = batch_plan(train_cfg, int(datamodule.hparams.batch_size), seq_len, world)
    if process_rank() == 0:
        warn_settings(cfg, total_steps)
    plan.warn_if_too_big(cfg, model_cfg)  # one line when the memory plan exceeds train.device_memory_gib
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(run_dir / "tokenizer.json"))  # (atomic) so that intermediate checkpoints can be evaluated
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), run_dir)
    changes = []
    if ckpt is not None:
        check_checkpoint_model(ckpt, model_cfg)
        from lrkv.io.checkpoints import read_metadata

        changes = resume_rules(
            read_metadata(ckpt),
            ckpt,
            cfg=cfg,
            data_hparams=dict(datamodule.hparams),
            total_steps=total_steps,
            batch_tokens=batch_tokens,
        )
    if init is not None:
        from lrkv.training.init_from import InitFrom, check_compatible

        check_compatible(init.model.cfg, model_cfg, str(train_cfg["init_from"]))
        if ckpt is None:  # resuming: the checkpoint's weights win
            state = init.model.state_dict()
            if tokenizer.vocab_size > (
                known := init.tokenizer.vocab_size if init.tokenizer else init.model.cfg.vocab_size
            ):
                from lrkv.training.init_from import grow_vocab  # data=chat added tokens: new rows = mean of old

                state = grow_vocab(state, model_cfg.vocab_size, known)
            extra_callbacks = [InitFrom(state, str(init.path)), *(extra_callbacks or [])]

    module = LanguageModel(
        model=model_cfg.to_dict(),
        optim=dict(cfg["optim"]),
        total_steps=total_steps,
        seed=int(cfg["seed"]),
        compile=bool(train_cfg.get("compile", False)),
        activation_checkpointing=bool(train_cfg.get("activation_checkpointing", False)),
        fsdp_param_dtype=fsdp_dtype,
        batch_tokens=batch_tokens,
    )
    with torch.device("meta"):
        shadow = Transformer(model_cfg)
    params = shadow.num_params()
    kv_bytes = kv_cache_bytes(model_cfg).per_token  # measured from a real cache (lrkv/measure.py)
    checkpoint = PeriodicCheckpoint(
        run_dir / "checkpoints",
        every_n_steps=int(train_cfg.get("ckpt_every", 0) or 0),
        keep=int(train_cfg.get("keep_checkpoints", 2)),
    )
    monitor = TrainMonitor(
        run_dir,
        log_every=int(train_cfg.get("log_every", 10)),
        tokens_per_step=batch_tokens,
        flops_per_token=shadow.flops_per_token(seq_len),
        kv_bytes_per_token=kv_bytes,
        params=params,
        peak_flops=train_cfg.get("peak_flops"),
        resume=ckpt is not None,
        progress_bar=bool(train_cfg.get("progress_bar", True)),
    )
    stop = GracefulStop(checkpoint)
    val_every = int(train_cfg.get("val_every", 0) or 0)
    has_validation = datamodule.hparams.val_batches != 0
    step_end = StepEnd(monitor, checkpoint, stop, val_every=val_every, has_validation=has_validation)
    trainer = L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=trainer_cfg.get("devices", 1),
        num_nodes=int(trainer_cfg.get("num_nodes", 1)),
        strategy=strategy,
        plugins=plugins or None,
        precision=precision,
        max_steps=total_steps,
        accumulate_grad_batches=accumulate,
        # every val_every steps; with val_every=0 only at the end (StepEnd asks for the final validation)
        val_check_interval=(val_every or total_steps + 1) * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_validation else 0,
        num_sanity_val_steps=0,
        logger=loggers or False,
        callbacks=[step_end, monitor, checkpoint, stop, *(extra_callbacks or [])],  # the step's order: step.py
        enable_checkpointing=False,
        enable_progress_bar=False,  # ours: one bar of optimizer steps (monitor.StepProgress)
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        deterministic=bool(trainer_cfg.get("deterministic", False)),
        use_distributed_sampler=False,
    )
    if trainer.world_size != world:
        raise ConfigError(
            f"trainer runs {trainer.world_size} processes, expected {world}; set trainer.devices explicitly"
        )
    if trainer.is_global_zero:
        dump_config({**cfg, "model": model_cfg.to_dict()}, run_dir)
        print(
            f"run {run_dir}: model {model_cfg.name} ({model_cfg.attention}), {params / 1e6:.2f}M params, "
            f"{shadow.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token (training), "
            f"KV cache {kv_bytes} B/token (bf16), {total_steps} steps x {batch_tokens} tokens "
            f"(micro batch {datamodule.hparams.batch_size} x {seq_len}, {world} process(es), accumulation {accumulate})"
        )
        if ckpt is not None:
            print(f"resuming from {ckpt}" + (": " + "; ".join(changes) if changes else " (same settings)"))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    wall = time.perf_counter() - start

    state = full_state_dict(module.model, trainer)
    summary = None
    if trainer.is_global_zero:
        save_pretrained(module.model, run_dir / "pretrained", tokenizer, state_dict=state)
        rows = read_metrics(run_dir / "metrics.csv")
        plot_losses(rows, run_dir / "loss.png", f"{model_cfg.name} ({model_cfg.attention})")
        summary = make_summary(
            cfg,
            model_cfg,
            rows,
            params,
            shadow.num_params(non_embedding=True),
            kv_bytes,
            trainer.global_step,
            batch_tokens,
            wall,
        )
        write_summary(run_dir, summary)
        print_summary(summary, run_dir)
    trainer.strategy.barrier()
    return summary


def full_state_dict(model: Transformer, trainer) -> dict | None:
    """The whole model's weights on rank 0 (gathered from FSDP shards when sharded)."""
    if isinstance(trainer.strategy, AtomicModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def last_value(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def make_summary(cfg, model_cfg, rows, params, non_embedding, kv_bytes, steps, batch_tokens, wall) -> dict:
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {
        "name": cfg.get("run_name"),
        "model": model_cfg.name,
        "attention": model_cfg.attention,
        "params": params,
        "non_embedding_params": non_embedding,
        "kv_bytes_per_token": kv_bytes,
        "steps": steps,
        "tokens": steps * batch_tokens,
        "final_train_loss": last_value(rows, "train_loss"),
        "final_val_loss": last_value(rows, "val_loss"),
        "final_val_bpb": last_value(rows, "val_bpb"),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "wall_time_s": wall,
        "model_config": model_cfg.to_dict(),
    }


def print_summary(summary: dict, run_dir: Path) -> None:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = [
        "model",
        "attention",
        "params",
        "kv_bytes_per_token",
        "steps",
        "tokens",
        "final_train_loss",
        "final_val_loss",
        "final_val_bpb",
        "tokens_per_s",
        "wall_time_s",
    ]
    print("\n" + "\n".join(f"  {k:<20} {fmt(summary[k])}" for k in keys))
    print(f"  outputs: {run_dir} (metrics.csv, loss.png, summary.json, pretrained/, checkpoints/)")


def dump_config(cfg: dict, run_dir: Path) -> None:
    """config.yaml: the resolved config this run trained with (model vocabulary included)."""
    from lrkv.data.utils import atomic_write

    atomic_write(str(run_dir / "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
