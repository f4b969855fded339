"""lm_eval.tasks suites (lrkv/evaluation/suites.py)."""

import pytest

from lrkv.errors import ConfigError
from lrkv.evaluation.suites import SUITES, expand_tasks


def test_paper_suite_expands_and_leaves_unsafe_code_out_unless_confirmed():
    tasks, notes = expand_tasks(["paper"])
    assert tasks == ["arc_easy", "arc_challenge", "mmlu", "gsm8k"]
    assert len(notes) == 1 and "humaneval" in notes[0] and "confirm_run_unsafe_code=true" in notes[0]
    tasks, notes = expand_tasks("hellaswag,paper,arc_easy", confirm_run_unsafe_code=True)
    assert tasks == ["hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"] and notes == []


def test_a_named_unsafe_task_without_confirmation_is_a_one_line_error():
    with pytest.raises(ConfigError, match="runs model-written code; set lm_eval.confirm_run_unsafe_code=true"):
        expand_tasks(["arc_easy", "humaneval"])
    assert expand_tasks(["humaneval"], confirm_run_unsafe_code=True)[0] == ["humaneval"]


@pytest.mark.slow
def test_the_paper_tasks_are_lm_eval_task_names():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert set(SUITES["paper"]) <= known
