"""Helpers for the Hydra entry points: one-line errors instead of stack traces."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from lrkv.config import config_dir
from lrkv.errors import LrkvError, TrainingInterrupted


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(fn):
    """Call fn(); an LrkvError (or a missing required config value) becomes `error: ...` and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return fn()
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = getattr(signal.Signals, e.signal_name, signal.SIGTERM)
        raise SystemExit(128 + int(code))
    except LrkvError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        fail(f"missing required value {key}; set it on the command line, e.g. {key}=...")


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
            compose(config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many kinds; all mean "bad override"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[0] if lines else type(e).__name__
        hint = next((line for line in lines[1:] if line.startswith("To append")), "")
        fail(f"bad override: {detail}" + (f" ({hint[0].lower() + hint[1:]})" if hint else ""))


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
                    f"unknown {key} {choice!r} (no {Path('configs') / key / (choice + '.yaml')}); choose one of: {', '.join(options)}"
                )
