"""Hydra callbacks (entry-point glue): work that runs once after a whole multirun.

    hydra.callbacks.compression_study: {_target_: lrkv.hydra_callbacks.CompressionStudy, ...}

used by configs/experiment/compress_study.yaml: train every model of the sweep, then compress the
full-attention run with EigenAttention and StiefAttention at several KV budgets and write one table
and one loss-vs-KV-bytes plot of trained and compressed models.

    hydra.callbacks.study_report: {_target_: lrkv.hydra_callbacks.StudyReport}

used by configs/experiment/study_*.yaml: aggregate the sweep folder's runs over seeds (lrkv.evaluation.study).
"""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lrkv.cli import run_cli


class CompressionStudy(Callback):
    def __init__(
        self,
        methods=("eigen", "stief"),
        budgets=(0.5, 0.6, 0.7, 0.8, 0.9),
        options=None,
        source_attention: str = "mha",
        folder: str = "compression_study",
    ):
        self.methods, self.budgets = list(methods), list(budgets)
        self.options = (
            OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options or {})
        )
        self.source_attention, self.folder = source_attention, folder

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from lrkv.evaluation.compression import compression_study

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir / self.folder
        result = run_cli(
            lambda: compression_study(
                [sweep_dir],
                out,
                methods=self.methods,
                budgets=self.budgets,
                options=self.options,
                source_attention=self.source_attention,
            )
        )
        print(result["text"])
        print(f"compression study: {out} (compare.md, pareto_kv.png, one folder per compressed model)")


class StudyReport(Callback):
    """After a multirun, aggregate every run of its sweep folder over seeds (lrkv.evaluation.study) into
    `<sweep dir>/<folder>/`: study.md, study.json and the loss and loss-vs-KV plots. Used by experiment=study_*,
    whose multiruns share one sweep folder, so the report after the last one covers all of them."""

    def __init__(self, folder: str = "report", prefix: str = "study", baseline_kind: str = "mha"):
        self.folder, self.prefix, self.baseline_kind = folder, prefix, baseline_kind

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from lrkv.evaluation.study import report_study, study_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir / self.folder
        text = run_cli(lambda: report_study(study_runs([sweep_dir], self.baseline_kind), out, self.prefix))
        print(text)
        print(f"study report: {out}/{self.prefix}.md (+ .json, -loss.png, -pareto.png)")
