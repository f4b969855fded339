"""Named task suites for lm-eval: `lm_eval.tasks=[paper]` -> the LRKV paper's downstream tasks.

    tasks, notes = expand_tasks(["paper"], confirm_run_unsafe_code=False)
    # tasks = ["arc_easy", "arc_challenge", "mmlu", "gsm8k"], notes = ["humaneval left out: ..."]

The paper's Table 2 (after mid-training) reports ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval;
their lm-eval task names are in SUITES["paper"]. HumanEval executes model-written Python, which
lm-eval runs only with `confirm_run_unsafe_code=True`: a named task that needs it is an error
unless the flag is set, and a suite leaves such tasks out with a note (so `[paper]` runs the four
safe tasks by default and all five with the flag).

`run_lm_eval` (lrkv/evaluation/downstream.py) expands `lm_eval.tasks` with this function, logs the notes,
records tasks and notes in the results, and passes `lm_eval.confirm_run_unsafe_code` (default false) on
to `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

from lrkv.errors import ConfigError

SUITES = {"paper": ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]}
UNSAFE_CODE_TASKS = {"humaneval", "humaneval_plus", "humaneval_instruct", "mbpp", "mbpp_plus", "mbpp_instruct"}
FLAG = "lm_eval.confirm_run_unsafe_code=true"


def expand_tasks(tasks, *, confirm_run_unsafe_code: bool = False) -> tuple[list[str], list[str]]:
    """Task names with suites expanded (order kept, duplicates dropped), and notes on what was left out."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out, notes = [], []
    for raw in tasks or []:
        name = str(raw).strip()
        if not name:
            continue
        if name in SUITES:
            for task in SUITES[name]:
                if task in UNSAFE_CODE_TASKS and not confirm_run_unsafe_code:
                    notes.append(f"{task} left out of suite {name!r}: it runs model-written code; set {FLAG} to run it")
                elif task not in out:
                    out.append(task)
            continue
        if name in UNSAFE_CODE_TASKS and not confirm_run_unsafe_code:
            raise ConfigError(f"lm-eval task {name!r} runs model-written code; set {FLAG} to allow it, or drop it")
        if name not in out:
            out.append(name)
    return out, notes
