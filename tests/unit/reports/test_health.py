"""service/reports/health.py and the report's page around it: each attempt judged from its own last signals against
thresholds re-derived here (complete collapse: spread under 0.1 of 1/sqrt(D); dimensional: RankMe under 2 % of
min(feature dimension, sample), watched under 10 %), and the routine checkpoint saves folded into one row. Real runs
judged: tests/e2e/test_health.py (collapsed on purpose) and tests/e2e/test_demo.py (the demo)."""

from __future__ import annotations

import json
import math
import re

import pytest

from service.reports.health import COMPLETE, DIMENSIONAL, DIVERGED, HEALTHY, NO_SIGNAL, WATCH, judge, rate
from service.reports.report import _event_rows, _events, _health_section
from service.reports.run_log import parse_stats

D, FEATURES, SAMPLE = 64, 512, 1078  # the tiny recipe's projector width, ResNet-18's features, the digits' bank
WALL = 1_796_529_514.0


def start(step: int, wall: float, world_size: int = 2) -> dict:
    return {"event": "start", "step": step, "epoch": 0, "total_steps": 32, "steps_per_epoch": 16,
            "world_size": world_size, "global_batch": 64, "wall": wall, "time": 0}


def logged(step: int, spread_of_reference: float, images_per_s: float = 100.0) -> dict:
    """A logged step whose embedding_std is `spread_of_reference` times 1/sqrt(D)."""
    return {"epoch": 0, "step": step, "lr_weights": 0.1, "lr_biases": 0.002, "loss": 40.0, "time": step,
            "step_time": 64 / images_per_s, "images_per_s": images_per_s,
            "embedding_std": spread_of_reference / math.sqrt(D),
            "correlation_diagonal": 0.6, "correlation_off_diagonal": 0.1}


def knn(step: int, rank_share: float | None) -> dict:
    line = {"epoch": 0, "step": step, "knn_top1": 50.0, "time": step}
    if rank_share is not None:
        line |= {"rankme": rank_share * min(FEATURES, SAMPLE), "rankme_sample": SAMPLE}
    return line


def stats(*lines: dict) -> str:
    return "barlow train spec.yaml\n" + "\n".join(json.dumps(line) for line in lines) + "\n"


def verdicts(*lines: dict) -> list[str]:
    return [attempt.verdict for attempt in judge(parse_stats(stats(*lines)), D, FEATURES)]


@pytest.mark.parametrize(("spread", "rank", "expected"), [
    (0.8, 0.24, HEALTHY),  # the demo after 10 epochs: 0.83 of 1/sqrt(D), 24 % of the bound
    (0.8, None, HEALTHY),  # the monitor off: judged on the spread alone
    (0.8, 0.05, WATCH),
    (0.8, 0.005, DIMENSIONAL),  # the run made to collapse: 0.5 %
    (0.05, 0.24, COMPLETE),  # every input near one point
    (0.8, 1.0 / min(FEATURES, SAMPLE), COMPLETE),  # RankMe 1: one direction
], ids=["healthy", "monitor off", "low rank", "dimensional", "complete (spread)", "complete (rank)"])
def test_an_attempt_is_judged_from_its_last_signals(spread, rank, expected):
    early = logged(0, 0.01)  # an earlier step's signal does not count: the attempt's last one does
    assert verdicts(start(0, WALL), early, logged(15, spread), knn(16, rank)) == [expected]


def test_with_the_monitor_off_the_last_logged_steps_rankme_is_judged():
    collapsed = {**logged(15, 0.8), "rankme": 0.01 * 256, "rankme_sample": 256}  # 1 % of the step's batch of 256
    assert verdicts(start(0, WALL), collapsed) == [DIMENSIONAL]
    assert verdicts(start(0, WALL), {**collapsed, "rankme": 0.3 * 256}) == [HEALTHY]


def test_without_the_specs_projector_width_the_rank_alone_is_judged():
    health = judge(parse_stats(stats(start(0, WALL), logged(15, 0.8), knn(16, 0.24))), None, FEATURES)
    assert health[0].verdict == HEALTHY and "no projector width" in health[0].reason
    assert judge(parse_stats(stats(start(0, WALL), logged(15, 0.8))), None, FEATURES)[0].verdict == NO_SIGNAL


def test_the_thresholds_sit_where_the_module_says():
    assert verdicts(start(0, WALL), logged(15, 0.099), knn(16, 0.24)) == [COMPLETE]
    assert verdicts(start(0, WALL), logged(15, 0.101), knn(16, 0.24)) == [HEALTHY]
    assert verdicts(start(0, WALL), logged(15, 0.8), knn(16, 0.0199)) == [DIMENSIONAL]
    assert verdicts(start(0, WALL), logged(15, 0.8), knn(16, 0.0201)) == [WATCH]
    assert verdicts(start(0, WALL), logged(15, 0.8), knn(16, 0.0999)) == [WATCH]
    assert verdicts(start(0, WALL), logged(15, 0.8), knn(16, 0.1001)) == [HEALTHY]


def test_each_attempt_has_its_own_verdict_and_no_signal_and_divergence_are_said():
    diverged = {"event": "diverged", "step": 20, "epoch": 1, "time": 30}
    lines = [start(0, WALL), logged(0, 0.8), knn(16, 0.24), start(16, WALL + 100, world_size=4),
             logged(16, 0.8), knn(32, 0.005), start(32, WALL + 200), start(32, WALL + 300), logged(32, 0.8), diverged]
    health = judge(parse_stats(stats(*lines)), D, FEATURES)
    assert [a.verdict for a in health] == [HEALTHY, DIMENSIONAL, NO_SIGNAL, DIVERGED]
    assert [a.world_size for a in health] == [2, 4, 2, 2]
    assert [a.steps for a in health] == [(0, 0), (16, 16), None, (32, 32)]
    rank = health[1].signals[1]
    assert rank.value == f"{0.005 * 512:.1f} of at most 512 (0.5%), 1078 images" and rank.state == DIMENSIONAL


def test_a_resume_supersedes_the_signals_it_trained_again():
    """Steps 8-15 of the first attempt were trained again by the second: its collapse there no longer holds."""
    lines = [start(0, WALL), logged(0, 0.8), logged(12, 0.01), start(8, WALL + 100), logged(12, 0.8)]
    assert verdicts(*lines) == [HEALTHY, HEALTHY]


def test_the_rate_is_the_last_attempts_median():
    log = parse_stats(stats(start(0, WALL), logged(0, 0.8, 10.0), start(1, WALL + 9), logged(1, 0.8, 100.0),
                            logged(2, 0.8, 300.0), logged(3, 0.8, 200.0)))
    assert rate(log).startswith("200 images/s, 0.32 s a step")


def test_routine_checkpoints_fold_into_one_row_with_their_count():
    saves = [{"event": "checkpoint", "step": step, "epoch": 0, "time": step} for step in (4, 8, 12, 16, 20)]
    lines = [start(0, WALL), *saves[:4], {"event": "preempted", "step": 16, "time": 18}, start(16, WALL + 60),
             saves[4], {"event": "end", "step": 24, "time": 25}]
    rows = _event_rows(_events(parse_stats(stats(*lines))))
    assert [(kind, steps) for _, kind, steps, _ in rows] == [
        ("start", "0"), ("checkpoint x 4", "4-16"), ("preempted", "16"), ("resume", "16"), ("checkpoint", "20"),
        ("end", "24")]
    assert rows[1][3] == "4 checkpoints saved, steps 4, 8, 12, 16"


def test_the_section_shows_each_verdict_and_its_data():
    health = judge(parse_stats(stats(start(0, WALL), logged(15, 0.8), knn(16, 0.005))), D, FEATURES)
    section = _health_section(health)
    assert re.search(r'attempt 1 \(steps 15-15, 2 workers\): <span class="verdict dimensional-collapse">'
                     r"dimensional collapse</span>", section)
    data = json.loads(re.search(r'<script type="application/json" id="health-data">(.*?)</script>', section)[1])
    assert data[0]["verdict"] == DIMENSIONAL and data[0]["signals"][0]["state"] == HEALTHY
