"""Downstream benchmarks through lm-evaluation-harness with the registered `lrkv` model.

`run_lm_eval` loads the checkpoint once, checks the task names against lm-eval's index (plus any
`include_path` folder of local task YAMLs), runs `lm_eval.simple_evaluate`, and returns the results;
`report_lm_eval` writes them as JSON and prints lm-eval's table.

Offline use: tasks whose data are local files (`dataset_path: json`, `dataset_kwargs.data_files`)
run with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; hub benchmarks need their datasets cached.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from pathlib import Path

from lrkv.errors import ConfigError, DataError
from lrkv.evaluation.report import write_json

log = logging.getLogger("lrkv")


def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(t).strip() for t in (tasks or []) if str(t).strip()]
    if not names:
        raise ConfigError("no lm-eval tasks given: pass lm_eval.tasks=[hellaswag,arc_easy,...]")
    return names


def task_manager(include_path=None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    paths = include_path if isinstance(include_path, (list, tuple)) else ([include_path] if include_path else [])
    for p in paths:
        if not Path(str(p)).expanduser().is_dir():
            raise DataError(f"lm_eval.include_path {p} is not a folder; point it at a folder of task YAML files")
    paths = [str(Path(str(p)).expanduser()) for p in paths]
    if not paths and not include_defaults:
        raise ConfigError("lm_eval.include_defaults=false needs lm_eval.include_path=DIR with task YAMLs")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name in known or Path(name).suffix in (".yaml", ".yml") and Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; add local tasks with lm_eval.include_path=DIR"
        raise ConfigError(f"unknown lm-eval task {name!r}{hint}")


def run_lm_eval(
    checkpoint,
    tasks,
    *,
    include_path=None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str = 8,
    max_batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int | None = None,
    max_gen_toks: int = 256,
    bootstrap_iters: int = 0,
    seed: int = 0,
    log_samples: bool = False,
    gen_kwargs: str | dict | None = None,
    prefix_eos: bool = True,
    confirm_run_unsafe_code: bool = False,
) -> dict:
    """Evaluate a checkpoint (path or loaded Pretrained) on lm-eval tasks; returns lm-eval's results dict.

    Suites in `tasks` (e.g. `paper`, lrkv/evaluation/suites.py) expand to their tasks; tasks that run
    model-written code (HumanEval) need confirm_run_unsafe_code=True.
    """
    import lm_eval

    from lrkv.evaluation.lm_eval_model import LrkvLM
    from lrkv.evaluation.suites import expand_tasks

    names, notes = expand_tasks(_task_list(tasks), confirm_run_unsafe_code=confirm_run_unsafe_code)
    for note in notes:
        log.warning(note)
    manager = task_manager(include_path, include_defaults)
    check_tasks(manager, names)
    lm = LrkvLM(
        checkpoint=checkpoint,
        device=device,
        batch_size=batch_size,
        max_batch_size=max_batch_size,
        dtype=dtype,
        max_length=max_length,
        max_gen_toks=max_gen_toks,
        prefix_eos=prefix_eos,
    )
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
        )
    except ConnectionError as e:
        raise DataError(f"lm-eval could not fetch a dataset ({e}); use cached or local task data") from None
    results = results or {}
    results["lrkv"] = {
        "checkpoint": str(getattr(lm.pretrained, "path", checkpoint)),
        "seconds": time.perf_counter() - start,
        "model": lm.model.cfg.to_dict(),
        "batch_size": lm.batch_size,
        "batch_size_requested": lm.batch_size_requested,
        "max_length": lm.max_length,
        "prefix_eos": lm.prefix_eos,
        "tasks": names,
        "notes": notes,
    }
    return results


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} without stderr entries and aliases (metric names keep lm-eval's ',filter')."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        out[task] = {
            k: v for k, v in metrics.items() if k != "alias" and "_stderr" not in k and isinstance(v, (int, float))
        }
    return out


def report_lm_eval(results: dict, out_dir: str | Path | None = None) -> str:
    try:
        from lm_eval.utils import make_table

        text = make_table(results)
        if results.get("groups"):
            text += "\n" + make_table(results, "groups")
    except Exception:  # noqa: BLE001 - pytablewriter missing or a results shape it does not know
        text = json.dumps(scores(results), indent=2)
    if out_dir is not None:
        out_dir = Path(out_dir)
        keep = {k: v for k, v in results.items() if k != "samples"}
        write_json(out_dir / "lm_eval_results.json", keep)
        write_json(out_dir / "lm_eval_scores.json", scores(results))
        if results.get("samples"):
            write_json(out_dir / "lm_eval_samples.json", results["samples"])
        (out_dir / "lm_eval_table.md").write_text(text + "\n")
    return text
