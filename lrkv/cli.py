"""Helpers for the Hydra entry points: one-line errors instead of stack traces (also in train.log)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from lrkv.config import config_dir
from lrkv.errors import LrkvError, TrainingInterrupted


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    to_log_files(f"error: {message}")
    raise SystemExit(code)


def to_log_files(line: str, level: int = logging.ERROR) -> None:
    """Write a line to the run's log files (Hydra's train.log) without printing it a second time."""
    record = logging.LogRecord("lrkv", level, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_cli(fn):
    """Call fn(); an LrkvError (or a missing required config value) becomes `error: ...` and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return fn()
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        to_log_files(f"stopped: {e}", logging.WARNING)
        code = getattr(signal.Signals, e.signal_name, signal.SIGTERM)
        raise SystemExit(128 + int(code)) from None
    except LrkvError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        fail(f"missing required value {key}; set it on the command line, e.g. {key}=...")
    except Exception as e:  # a bug or an unforeseen failure: the traceback is printed, train.log gets the line
        to_log_files(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise


def precheck(argv: list[str], config_name: str) -> None:
    """Validate command-line overrides before Hydra runs, so that mistakes give one line, not a report.

    Group choices (`model=foo`) are checked against configs/<group>/*.yaml; other overrides by
    composing the config once (single runs only: sweeps are checked by Hydra itself).
    """
    check_group_choices(argv)
    if any(a.startswith("-") for a in argv):  # -m, --cfg, --help ...: Hydra's own business
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("hydra.") and not a.startswith("hydra/")]
    try:
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)):
            return  # a sweep (experiment with hydra.mode=MULTIRUN): Hydra checks each job
    except Exception as e:  # noqa: BLE001
        fail(f"bad override: {str(e).splitlines()[0]}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many kinds; all mean "bad override"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[0] if lines else type(e).__name__
        hint = next((line for line in lines[1:] if line.startswith("To append")), "")
        fail(f"bad override: {detail}" + (f" ({hint[0].lower() + hint[1:]})" if hint else ""))
    try:
        output_dir = cfg.paths.output_dir if "paths" in cfg else None
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's run can resolve: checked when writing
        output_dir = None
    if output_dir:
        problem = unwritable(str(output_dir))
        if problem:
            fail(f"cannot write the output folder {output_dir}: {problem}; set paths.output_dir=A_WRITABLE_FOLDER")


def unwritable(path: str) -> str | None:
    """Why `path` (a folder, created if missing) cannot be written, or None: checked on the nearest existing
    folder, before Hydra creates anything there."""
    current = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not os.path.isdir(current):
        return f"{current} is a file, not a folder"
    if not os.access(current, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(current).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        return f"{current} is on a read-only filesystem" if readonly else f"permission denied on {current}"
    return None


def check_group_choices(argv: list[str]) -> None:
    """Before Hydra starts: `model=foo` with no configs/model/foo.yaml is a one-line error listing the choices."""
    root = config_dir()
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        group = root / key
        if "." in key or not group.is_dir() or value in ("null", ""):
            continue
        for choice in value.split(","):  # multirun: model=a,b,c
            if choice and not (group / f"{choice}.yaml").is_file():
                options = sorted(p.stem for p in group.glob("*.yaml"))
                fail(
                    f"unknown {key} {choice!r} (no {Path('configs') / key / (choice + '.yaml')}); "
                    f"choose one of: {', '.join(options)}"
                )
