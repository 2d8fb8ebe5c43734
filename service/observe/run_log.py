"""Reading a run's stats.txt back: its attempts, its logged steps, the kNN monitor and the events.

stats.txt is the reference's format, appended to by every attempt of a run: a command line, then one JSON object
per line (logged steps, the kNN monitor, and events such as `{"event": "start", ...}`). A resumed attempt trains
again the steps after its checkpoint, so a `start` event after S completed steps hides the earlier logged steps
from index S on and the other earlier lines (kNN, checkpoints, events) after S: what remains is the history of
the weights that exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.spec import StorageSpec
from service.storage.filesystem import filesystem

STATS = "stats.txt"


@dataclass
class RunLog:
    """The lines of a stats.txt that still describe the run, in order, by kind."""

    steps: list[dict[str, Any]] = field(default_factory=list)  # logged steps: {"epoch", "step", "loss", ...}
    knn: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "step", "knn_top1", "time"}
    events: list[dict[str, Any]] = field(default_factory=list)  # {"event": "start" | "checkpoint" | ..., ...}
    other: list[dict[str, Any]] = field(default_factory=list)  # evaluation results, resumes with changes, ...

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == "start"]

    @property
    def last_step(self) -> dict[str, Any] | None:
        return self.steps[-1] if self.steps else None

    def wall_clock(self, line: dict[str, Any]) -> float | None:
        """Unix time of a line: its attempt's start plus its `time` (None before any start event)."""
        start = line.get("_start")
        return None if start is None else start + line.get("time", 0)


def _retrained(line: dict[str, Any], resumed: int) -> bool:
    """Whether a resume from `resumed` completed steps trains again what `line` describes: a logged step's `step`
    is the step it trained (index `resumed` is trained again), every other line's the steps completed before it."""
    return line["step"] >= resumed if "lr_weights" in line else line["step"] > resumed


def parse_stats(text: str) -> RunLog:
    """A RunLog from stats.txt's text, later attempts superseding the steps they trained again."""
    kept: list[dict[str, Any]] = []
    wall: float | None = None
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        if not raw.startswith("{"):  # an attempt's command line
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line cut short by a crash mid-write: the next attempt starts a new one
            continue
        if line.get("event") == "start":
            wall = line.get("wall")
            kept = [old for old in kept if "step" not in old or not _retrained(old, line["step"])]
        line["_start"] = wall
        kept.append(line)
    log = RunLog()
    for line in kept:
        if "event" in line:
            log.events.append(line)
        elif "knn_top1" in line:
            log.knn.append(line)
        elif "loss" in line and "lr_weights" in line:
            log.steps.append(line)
        else:
            log.other.append(line)
    return log


def read_run_log(run_url: str, storage: StorageSpec) -> RunLog | None:
    """The run's stats.txt parsed, or None when it has none yet."""
    fs, path = filesystem(f"{run_url.rstrip('/')}/{STATS}", storage)
    if not fs.exists(path):
        return None
    return parse_stats(fs.cat_file(path).decode())
