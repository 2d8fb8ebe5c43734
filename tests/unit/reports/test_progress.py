"""service/reports/progress.py: a run's progress read back from its storage, in process: the states, the ETA and
the numbers of run folders written here. `barlow status` and `barlow runs ls` as typed are tests/e2e/test_progress.py's.

The expected numbers are worked out here from the lines the synthetic run holds (tests/support/progress.py), never
through the code under test."""

from __future__ import annotations

import json

import pytest

from service.reports.progress import NoRun, read_progress
from service.spec import StorageSpec
from tests.support.progress import WALL_2, lease, write_synthetic_run

# stats.txt of write_synthetic_run (tests/support/progress.py), worked out by hand: attempt 2 hides attempt 1's lines
# at steps >= 5 (its loss 999, its step time 100, its kNN after 5 steps). Steps 0-11 are trained: 12 done of 20, epoch
# 12 // 5 = 2; the loss and images/s of step 11; the ETA over the 5 newest lines of attempt 2, (20 - 12) x mean(29, 31,
# 30, 28, 32) = 240 s; the last line is step 11's, at attempt 2's start + 280 s.
DONE, TOTAL, EPOCH, LOSS, IMAGES_PER_S, KNN, ETA_S, LAST_LINE = 12, 20, 2, 39.0, 256 / 32, 42.5, 240.0, WALL_2 + 280


def test_progress_of_a_resumed_running_run(tmp_path):
    run = tmp_path / "run"
    write_synthetic_run(run)
    now = LAST_LINE + 30
    (run / "lease.json").write_text(lease(heartbeat=now - 59))  # younger than the spec's timeout, 60 s
    progress = read_progress(str(run), StorageSpec(), now=now)
    assert (progress.state, progress.step, progress.total, progress.epoch) == ("running", DONE, TOTAL, EPOCH)
    assert (progress.loss, progress.images_per_s, progress.knn_top1) == (LOSS, IMAGES_PER_S, KNN)
    assert progress.eta_s == pytest.approx(ETA_S)
    assert progress.updated == LAST_LINE
    assert "job-7 on host node-7 (pid 4242), heartbeat 59 s ago" in progress.detail
    assert progress.checkpoint is None  # none written


def test_eta_just_after_a_resume_uses_only_the_new_attempt(tmp_path):
    """Attempt 2 cut after its step 6: 7 steps done; its two lines (10 s, 20 s) give the step time, not attempt 1's
    100 s lines before the resume: (20 - 7) x 15 s."""
    run = tmp_path / "run"
    write_synthetic_run(run, second_attempt_steps=2)
    (run / "lease.json").write_text(lease(heartbeat=LAST_LINE))
    progress = read_progress(str(run), StorageSpec(), now=LAST_LINE)
    assert (progress.state, progress.step) == ("running", 7)
    assert progress.eta_s == pytest.approx(13 * 15.0)


@pytest.mark.parametrize(("last_line", "lease_age", "state", "detail"), [
    (None, 61, "stopped", "lease.json left by job job-7"),  # heartbeat past the spec's timeout: the holder died
    (None, None, "stopped", "killed or crashed"),
    ({"event": "preempted", "step": 12, "epoch": 2, "time": 330}, None, "preempted", "after step 12"),
    ({"event": "diverged", "step": 11, "epoch": 2, "time": 330}, None, "failed", "non-finite at step 11"),
    ({"event": "end", "step": 12, "epoch": 2, "time": 330}, None, "finished", ""),
])
def test_states_without_a_live_lease(tmp_path, last_line, lease_age, state, detail):
    run = tmp_path / "run"
    write_synthetic_run(run)
    now = LAST_LINE + 100
    if last_line:
        with open(run / "stats.txt", "a") as stats:
            stats.write(json.dumps(last_line) + "\n")
    if lease_age is not None:
        (run / "lease.json").write_text(lease(heartbeat=now - lease_age))
    progress = read_progress(str(run), StorageSpec(), now=now)
    assert progress.state == state and detail in progress.detail
    assert progress.eta_s is None and progress.step == DONE and progress.total == TOTAL


def test_read_progress_of_nothing_is_no_run(tmp_path):
    with pytest.raises(NoRun, match="no run here"):
        read_progress(str(tmp_path), StorageSpec())
