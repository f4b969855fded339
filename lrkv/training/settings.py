"""What the run's numbers must be, and what may change when a run is resumed (docs/training.md).

`check_settings(cfg)` validates every numeric field of train/data/tokenizer/optim/trainer before any
work starts: a wrong type or range is one line naming the field. `resume_rules(saved, cfg, ...)`
compares a checkpoint's settings with this run's: what may change is reported (and applied, see
`apply_optim_settings`), what cannot is refused in one line naming the setting.
"""

from __future__ import annotations

import logging
import math

from lrkv.errors import CheckpointError, ConfigError

log = logging.getLogger("lrkv")

INT, FLOAT, BOOL = "an integer", "a number", "true or false"
# (field, kind, lower bound, lower bound inclusive, upper bound (exclusive), may be null)
FIELDS = {
    "seed": (INT, 0, True, None, False),
    "train.batch_tokens": (INT, 1, True, None, True),
    "train.max_steps": (INT, 1, True, None, True),
    "train.max_tokens": (INT, 1, True, None, True),
    "train.val_every": (INT, 0, True, None, True),
    "train.log_every": (INT, 1, True, None, False),
    "train.ckpt_every": (INT, 0, True, None, True),
    "train.keep_checkpoints": (INT, 1, True, None, False),
    "train.peak_flops": (FLOAT, 0, False, None, True),
    "train.compile": (BOOL, None, True, None, False),
    "train.activation_checkpointing": (BOOL, None, True, None, False),
    "train.vocab_from_tokenizer": (BOOL, None, True, None, False),
    "train.progress_bar": (BOOL, None, True, None, False),
    "data.batch_size": (INT, 1, True, None, False),
    "data.val_batch_size": (INT, 1, True, None, True),
    "data.val_batches": (INT, 0, True, None, True),
    "data.seq_len": (INT, 2, True, None, False),
    "data.num_workers": (INT, 0, True, None, False),
    "data.val_fraction": (FLOAT, 0, True, 1, False),
    "data.split_seed": (INT, 0, True, None, False),
    "data.max_tokens": (INT, 1, True, None, True),
    "data.val_max_tokens": (INT, 1, True, None, True),
    "data.max_documents": (INT, 1, True, None, True),
    "data.val_documents": (INT, 1, True, None, True),
    "data.block_documents": (INT, 1, True, None, False),
    "tokenizer.vocab_size": (INT, 260, True, None, False),  # 256 bytes + end-of-text + a few merges
    "tokenizer.max_chars": (INT, 1, True, None, True),
    "optim.matrix_lr": (FLOAT, 0, False, None, False),
    "optim.embed_lr": (FLOAT, 0, False, None, False),
    "optim.head_lr": (FLOAT, 0, False, None, False),
    "optim.scalar_lr": (FLOAT, 0, False, None, False),
    "optim.eps": (FLOAT, 0, False, None, False),
    "optim.weight_decay": (FLOAT, 0, True, None, False),
    "optim.momentum": (FLOAT, 0, True, 1, False),
    "optim.ns_steps": (INT, 1, True, None, False),
    "optim.grad_clip": (FLOAT, 0, True, None, True),
    "optim.warmup_steps": (INT, 0, True, None, False),
    "optim.min_lr_ratio": (FLOAT, 0, True, 1.000001, False),
    "optim.decay_fraction": (FLOAT, 0, False, 1.000001, False),
    "optim.width_scale": (BOOL, None, True, None, False),
    "trainer.num_nodes": (INT, 1, True, None, False),
    "trainer.deterministic": (BOOL, None, True, None, False),
}
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_field(name: str, value, kind: str, low, low_inclusive: bool, high, nullable: bool) -> None:
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{name} is null; set it to {kind}")
    if kind == BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be {kind}")
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind == INT and not float(value).is_integer()) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be {kind}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ConfigError(f"{name}={value!r} is out of range: it must be {bound}")
    if high is not None and value >= high:
        raise ConfigError(f"{name}={value!r} is out of range: it must be below {high:g}")


def check_settings(cfg: dict) -> None:
    """Every numeric (and boolean) field of train/data/tokenizer/optim/trainer, up front, one line each."""
    for name, rule in FIELDS.items():
        value = _get(cfg, name)
        if value is not _MISSING:
            check_field(name, value, *rule)
    train = cfg.get("train") or {}
    if not train.get("max_steps") and not train.get("max_tokens"):
        raise ConfigError("set train.max_steps or train.max_tokens (the training budget)")
    optim = cfg.get("optim") or {}
    betas = optim.get("betas")
    if betas is not None and (
        not isinstance(betas, (list, tuple))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optim.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if optim.get("schedule", "cosine") not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.get('schedule')!r} is unknown; use cosine, wsd or constant")
    trainer = cfg.get("trainer") or {}
    if str(trainer.get("precision", "auto")) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={trainer.get('precision')!r} is unknown; use one of {', '.join(PRECISIONS)}"
        )
    if trainer.get("accelerator", "auto") not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={trainer.get('accelerator')!r} is unknown; use one of {', '.join(ACCELERATORS)}"
        )
    devices = trainer.get("devices", 1)
    ok = devices in ("auto", -1, "-1") or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
    ok = ok or (isinstance(devices, (list, tuple)) and len(devices) > 0)
    if not ok:
        raise ConfigError(f"trainer.devices={devices!r} must be a positive integer, a list of device ids or auto")


def warn_settings(cfg: dict, total_steps: int) -> list[str]:
    """Settings that work but are probably not what was meant: logged as warnings (and returned)."""
    warnings = []
    warmup = int((cfg.get("optim") or {}).get("warmup_steps") or 0)
    if warmup > total_steps:
        warnings.append(
            f"optim.warmup_steps={warmup} is longer than the run ({total_steps} steps): the learning rate never "
            "reaches its peak; lower optim.warmup_steps"
        )
    for message in warnings:
        log.warning(message)
    return warnings


def warn_small_tokenizer(asked: int, got: int) -> str | None:
    """A trained BPE much smaller than asked (the corpus has too little text for that many merges)."""
    if got >= 0.8 * asked:
        return None
    message = (
        f"the trained tokenizer has {got} tokens, tokenizer.vocab_size asked {asked}: the corpus is too small for "
        f"that many merges; lower tokenizer.vocab_size (or add text)"
    )
    log.warning(message)
    return message


# ---- resume -----------------------------------------------------------------------------------
# data settings that decide which tokens the saved data position points at
DATA_FIXED = ("source", "name", "split", "val_split", "text_field", "txt_unit", "val_fraction", "split_seed")
DATA_FIXED += ("max_documents", "val_documents", "storage", "seq_len", "tokenizer")


def resume_rules(saved: dict, ckpt, *, cfg: dict, data_hparams: dict, total_steps: int, batch_tokens: int) -> list:
    """Compare a checkpoint's settings (its metadata) with this run's.

    Refused (CheckpointError naming the setting): optim.name, seed, train.batch_tokens, the data
    settings in DATA_FIXED, and a budget that the checkpoint has already passed. (The model shape is
    checked by run.check_checkpoint_model.) Returned as "what changes" lines: a new budget (the
    schedule is recomputed for it) and any changed optim value (applied from the first resumed step).
    """
    hp = saved.get("hyper_parameters") or {}
    step = int(saved.get("global_step", 0))

    def refuse(setting: str, old, new, why: str):
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with {setting}={old!r}, this run has {new!r}; {why}: resume with "
            f"{setting}={old!r} (or start a new run)"
        )

    old_optim, new_optim = dict(hp.get("optim") or {}), dict(cfg.get("optim") or {})
    if old_optim.get("name") and old_optim.get("name") != new_optim.get("name"):
        refuse("optim.name", old_optim.get("name"), new_optim.get("name"), "the optimizer state does not carry over")
    if "seed" in hp and hp["seed"] != cfg.get("seed"):
        refuse("seed", hp["seed"], cfg.get("seed"), "the data order and random state follow the seed")
    if hp.get("batch_tokens") and hp["batch_tokens"] != batch_tokens:
        refuse("train.batch_tokens", hp["batch_tokens"], batch_tokens, "steps and data positions count batches")
    old_data = saved.get("datamodule_hyper_parameters") or {}
    for key in DATA_FIXED:
        if key in old_data and key in data_hparams and old_data[key] != data_hparams[key]:
            refuse(f"data.{key}", old_data[key], data_hparams[key], "the saved data position is for that data")
    if total_steps <= step:
        raise CheckpointError(
            f"checkpoint {ckpt} is at step {step} and this run's budget is {total_steps} steps; raise "
            "train.max_steps (or train.max_tokens) above it to continue"
        )
    changes = []
    old_total = hp.get("total_steps")
    if old_total and old_total != total_steps:
        changes.append(f"budget {old_total} -> {total_steps} steps: the learning-rate schedule is recomputed")
    for key in sorted(set(old_optim) | set(new_optim)):
        if key != "name" and old_optim.get(key) != new_optim.get(key):
            changes.append(f"optim.{key} {old_optim.get(key)!r} -> {new_optim.get(key)!r}")
    return changes


def apply_optim_settings(module, optimizer, scheduler) -> None:
    """On resume: this run's optim values and budget replace the restored ones; the optimizer state stays.

    The restored param groups carry the checkpoint's hyperparameters and the scheduler its schedule.
    Rebuilding the groups from the current config (no state) and recomputing lr = base x factor(step)
    changes nothing when nothing changed (exact resume), and applies a new budget, schedule or
    learning rate from the first resumed step otherwise.
    """
    from lrkv.training.optim import build_optimizer

    fresh = build_optimizer(module.model, dict(module.hparams.optim)).param_groups
    schedule = module.lr_schedule()
    for group, new, fn in zip(optimizer.param_groups, fresh, scheduler.lr_lambdas):
        for key, value in new.items():
            if key not in ("params", "lr"):
                group[key] = value
        group["initial_lr"] = new["lr"]
        fn.schedule = dict(schedule)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
