"""service/reports/run_log.py: stats.txt's lines typed: every line a run of this project writes passes, each other
form is named, and a skipped line hides nothing a resume superseded (the hostile-storage suite:
tests/integration/test_hostile_runs_and_data.py)."""

from __future__ import annotations

import json

import pytest

from service.reports.run_log import line_problem, parse_lines

START = {"event": "start", "step": 0, "epoch": 0, "total_steps": 16, "steps_per_epoch": 16, "world_size": 1,
         "global_batch": 64, "resumed_from": None, "wall": 1796529514.150973, "time": 0}
STEP = {"epoch": 0, "step": 1, "lr_weights": 0.003125, "lr_biases": 7.5e-05, "loss": 46.07961654663086, "time": 4,
        "loss_on_diag": 45.46, "loss_off_diag": 0.61, "step_time": 2.22, "images_per_s": 28.7,
        "images_per_s_per_worker": 28.7, "data_wait": 0.0027, "peak_memory_gib": 1.02, "embedding_std": 0.087}


@pytest.mark.parametrize("line", [
    START, STEP, {"epoch": 0, "step": 16, "knn_top1": 43.8, "time": 30},
    {"event": "checkpoint", "step": 4, "epoch": 0, "url": "/r/checkpoints/step-000000004", "time": 9},
    {"event": "diverged", "step": 6, "epoch": 0, "time": 9}, {**STEP, "loss": float("nan"), "peak_memory_gib": None},
    {"epoch": 0, "step": 2, "resumed_with_changes": ["optim.lr_weights"], "time": 3},
    {"mode": "knn", "k": 200, "acc1": 90.5, "acc5": 99.0, "time": 1},
], ids=["start", "step", "knn", "checkpoint", "diverged", "nan loss", "resume with changes", "evaluation"])
def test_every_line_a_run_writes_passes(line):
    assert line_problem(json.loads(json.dumps(line))) is None


@pytest.mark.parametrize("line, why", [
    ([1], "not a JSON object"),
    ({**STEP, "step": "eight"}, "step is 'eight', not a count"),
    ({**STEP, "step": True}, "step is True, not a count"),
    ({**STEP, "epoch": -1}, "epoch is -1, not a count"),
    ({**START, "total_steps": 10**400}, "total_steps is 1000000000"),
    ({**STEP, "time": None}, "time is None, not a time in seconds"),
    ({**STEP, "step_time": float("inf")}, "step_time is inf, not a time in seconds"),
    ({**START, "wall": 1e300}, "wall is 1e+300, not a time in seconds"),
    ({**STEP, "loss": "low"}, "loss is 'low', not a number"),
    ({**STEP, "images_per_s": 10**400}, "images_per_s is 1000000000"),
    ({"event": "pwned", "step": 1}, "event 'pwned' is none of start, checkpoint"),
    ({"event": "start", "step": 0}, "no total_steps"),
    ({"event": "end"}, "no step"),
    ({"step": 3, "knn_top1": None}, "no knn_top1"),
    ({**STEP, "loss": None}, "no loss"),
])
def test_each_other_form_is_named(line, why):
    assert line_problem(line).startswith(why)


def test_a_skipped_line_hides_nothing_a_resume_superseded():
    """A resume at step 1 supersedes attempt 1's step 1; the bad lines between are skipped and listed."""
    lines = [json.dumps(line).encode() for line in (START, {**STEP, "step": 0}, STEP)]
    lines += [b"barlow train x", json.dumps({**STEP, "step": "x"}).encode(), None, b'{"cut short',
              json.dumps({**START, "step": 1, "wall": START["wall"] + 60}).encode(), json.dumps(STEP).encode()]
    log = parse_lines(lines)
    assert [(line["step"], line["_start"]) for line in log.steps] == [(0, START["wall"]), (1, START["wall"] + 60)]
    assert log.skipped == ["line 5: step is 'x', not a count", "line 6: longer than 65,536 bytes"]
