"""Evaluate checkpoints and compare runs: `python evaluate.py mode=NAME ckpt=RUN_DIR ...`.

Modes: loss, lm_eval, footprint, compare, diversity, generate, compress, export, convert. Their code
is lrkv/evaluation/modes.py (one function per mode); configs/evaluate.yaml lists every option, each
mode's under its own key. This file only hands the Hydra config to `lrkv.evaluation.modes.run`.
Errors of the framework (`LrkvError`) print as one line, `error: ...`, with exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lrkv.cli import precheck, run_cli


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lrkv.evaluation.modes import run

    run_cli(lambda: run(cfg, cfg.out_dir or HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    precheck(sys.argv[1:], "evaluate")
    main()
