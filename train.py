"""Train a model: `python train.py [model=lrkv_1b] [data=...] [trainer=...] [experiment=...]`.

Thin Hydra entry point; the work is in lrkv.training.run.train. See README.md and configs/train.yaml.
"""

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from lrkv.cli import precheck, run_cli


def launch(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from lrkv.training.run import train

    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    for group in ("callbacks", "logger"):
        plain.pop(group, None)
    return train(plain, HydraConfig.get().runtime.output_dir, extra_callbacks=callbacks, loggers=loggers)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run_cli(lambda: launch(cfg))
    return summary.get("final_val_loss") if summary else None  # the value a hyperparameter sweep minimises


def check_multiprocess_launch(argv: list[str]) -> None:
    """Under torchrun or srun every process runs this script: they must agree on the run folder, and the
    default run_name has a timestamp. (Lightning's own launcher passes hydra.run.dir to its children.)"""
    processes = max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_NTASKS", "1")))
    named = any(a.startswith(("run_name=", "hydra.run.dir=")) for a in argv)
    if processes > 1 and not named:
        from lrkv.cli import fail

        fail(f"{processes} processes were launched: pass run_name=NAME so that they all write the same run folder")


if __name__ == "__main__":
    check_multiprocess_launch(sys.argv[1:])
    precheck(sys.argv[1:], "train")
    main()
