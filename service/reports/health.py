"""A run's health without labels: each attempt's collapse signals against what a healthy run and a collapsing one
show, and a plain verdict.

Two kinds of collapse (Jing et al., ICLR 2022 name the second): complete, every input mapped to one point (the
embeddings' spread on the sphere, `embedding_std`, goes to 0 from about 1/sqrt(D)); dimensional, the features
filling only a few directions of their space (RankMe, the effective rank of the kNN monitor's features, far below
min(feature dimension, sample)). The cross-correlation's mean diagonal and off-diagonal magnitudes are shown beside
them (Barlow Twins drives the first to 1 and the second to 0) but not judged: at initialisation they are close to
each other, as in a collapsed run.

The thresholds are measured (docs/watching-a-run.md): spread 0.70-0.83 of 1/sqrt(D) in healthy runs (the tiny
recipe, the demo); RankMe 16 % of its bound for a random ResNet-18, 24 % and 20 % for the demo after 10 and 30
epochs, 0.5 % for the run made to collapse (tests/e2e/test_health.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from service.reports.run_log import RunLog

COMPLETE_SPREAD = 0.1  # embedding_std below this fraction of 1/sqrt(D): every input near one point
DIMENSIONAL_RANK = 0.02  # RankMe below this fraction of min(feature dimension, sample): a few directions left
WATCH_RANK = 0.10  # below this fraction: not collapsed, but worth watching
ONE_DIRECTION = 1.5  # RankMe at most this: every feature along one direction, or none (0: all zero)

HEALTHY, WATCH, DIMENSIONAL, COMPLETE, DIVERGED, NO_SIGNAL = (
    "healthy", "watch", "dimensional collapse", "complete collapse", "diverged", "no signal yet")


@dataclass(frozen=True)
class Signal:
    name: str
    value: str  # as shown, "-" when not measured
    healthy: str  # what a healthy run shows
    collapsing: str  # what a collapsing one shows
    state: str  # HEALTHY, WATCH, DIMENSIONAL, COMPLETE, or "" (shown, not judged)


@dataclass
class AttemptHealth:
    number: int  # 1 for the run's first attempt
    world_size: int | None
    steps: tuple[int, int] | None  # the first and last logged step of the attempt that still hold
    verdict: str
    reason: str
    signals: list[Signal] = field(default_factory=list)


def _attempts(log: RunLog) -> list[tuple[dict[str, Any], list[dict], list[dict]]]:
    """(start event, logged steps, kNN lines) of each attempt, a line belonging to the start it was written after."""
    attempts: list[tuple[dict[str, Any], list[dict], list[dict]]] = [(start, [], []) for start in log.starts]
    by_wall = {start.get("wall"): attempt for start, *attempt in attempts}
    for line in log.steps:
        if (attempt := by_wall.get(line.get("_start"))) is not None:
            attempt[0].append(line)
    for line in log.knn:
        if (attempt := by_wall.get(line.get("_start"))) is not None:
            attempt[1].append(line)
    return attempts


def _diverged(log: RunLog, start: dict[str, Any]) -> bool:
    return any(event["event"] == "diverged" and event.get("_start") == start.get("wall") for event in log.events)


def judge(log: RunLog, projector_width: int | None, feature_dim: int | None) -> list[AttemptHealth]:
    """Each attempt's signals and verdict, from its last logged step and its last kNN monitor line."""
    judged = []
    for number, (start, steps, knn) in enumerate(_attempts(log), 1):
        last = steps[-1] if steps else {}
        monitor = knn[-1] if knn else {}
        spread, spread_state = _spread(last.get("embedding_std"), projector_width)
        ranked = monitor if "rankme" in monitor else last  # the monitor's sample, else a logged step's batch
        rank, rank_state = _rank(ranked.get("rankme"), ranked.get("rankme_sample"), feature_dim)
        signals = [spread, rank, *_correlation(last)]
        if _diverged(log, start):
            verdict, reason = DIVERGED, "the loss or the gradients stopped being finite (see the events)"
        elif COMPLETE in (spread_state, rank_state):
            verdict = COMPLETE
            reason = ("the embeddings' spread is near 0" if spread_state == COMPLETE
                      else "the features point in one direction")
        elif rank_state == DIMENSIONAL:
            verdict, reason = DIMENSIONAL, "the features fill only a few of their dimensions"
        elif rank_state == WATCH:
            verdict, reason = WATCH, "the features' effective rank is low: compare with earlier runs of this recipe"
        elif HEALTHY in (spread_state, rank_state):
            verdict = HEALTHY
            reason = ("spread and effective rank as a healthy run's" if spread_state == rank_state else
                      "spread as a healthy run's (no RankMe yet)" if spread_state == HEALTHY else
                      "effective rank as a healthy run's (the spread is not judged: no projector width in the spec)")
        else:
            verdict, reason = NO_SIGNAL, "no logged step with the collapse signal yet"
        judged.append(AttemptHealth(number, start.get("world_size"),
                                    (steps[0]["step"], steps[-1]["step"]) if steps else None, verdict, reason,
                                    signals))
    return judged


def _spread(value: Any, width: int | None) -> tuple[Signal, str]:
    reference = f"1/sqrt(D) = {1 / math.sqrt(width):.4f}" if width else "1/sqrt(D)"
    state, shown = "", "-"
    if isinstance(value, (int, float)) and math.isfinite(value):
        shown = f"{value:.4f}"
        if width:
            ratio = value * math.sqrt(width)
            shown += f" ({ratio:.2f} of 1/sqrt(D))"
            state = COMPLETE if ratio < COMPLETE_SPREAD else HEALTHY
    signal = Signal("embedding_std (spread of the L2-normalised embeddings)", shown,
                    f"near {reference} (0.7-0.85 of it measured)",
                    f"towards 0: complete collapse below {COMPLETE_SPREAD:g} of it", state)
    return signal, state


def _rank(value: Any, sample: Any, feature_dim: int | None) -> tuple[Signal, str]:
    bound = min(b for b in (sample, feature_dim) if isinstance(b, int) and b > 0) if any(
        isinstance(b, int) and b > 0 for b in (sample, feature_dim)) else None
    state, shown = "", "-"
    if isinstance(value, (int, float)) and math.isfinite(value):
        shown = f"{value:.1f}" + (f" of at most {bound} ({value / bound:.1%})" if bound else "") + (
            f", {sample} images" if isinstance(sample, int) else "")
        if value <= ONE_DIRECTION:
            state = COMPLETE
        elif bound:
            share = value / bound
            state = DIMENSIONAL if share < DIMENSIONAL_RANK else WATCH if share < WATCH_RANK else HEALTHY
    signal = Signal("RankMe (effective rank of the backbone's features: the kNN monitor's, else a logged batch's)",
                    shown,
                    f"a sizeable share of min(feature dimension, sample): above {WATCH_RANK:.0%}",
                    f"far below it: dimensional collapse under {DIMENSIONAL_RANK:.0%}, complete at 1", state)
    return signal, state


def _correlation(last: dict[str, Any]) -> list[Signal]:
    def shown(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    return [Signal("mean |C_ii| (cross-correlation diagonal)", shown(last.get("correlation_diagonal")),
                   "rises towards 1: the two views agree", "stays low: the views' embeddings disagree", ""),
            Signal("mean |C_ij|, i != j (off-diagonal)", shown(last.get("correlation_off_diagonal")),
                   "falls towards 0, far below the diagonal: decorrelated dimensions",
                   "close to the diagonal's: every dimension says the same", "")]


def rate(log: RunLog) -> str:
    """The newest attempt's median throughput over its logged steps."""
    attempts = _attempts(log)
    steps = attempts[-1][1] if attempts else log.steps
    rates = [line["images_per_s"] for line in steps if isinstance(line.get("images_per_s"), (int, float))]
    times = [line["step_time"] for line in steps if isinstance(line.get("step_time"), (int, float))]
    if not rates:
        return "-"
    return f"{statistics.median(rates):,.0f} images/s, {statistics.median(times):.3g} s a step (median, last attempt)"
