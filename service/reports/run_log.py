"""Reading a run's stats.txt back: its attempts, its logged steps, the kNN monitor and the events.

stats.txt is the reference's format, appended to by every attempt of a run: a command line, then one JSON object
per line (logged steps, the kNN monitor, and events such as `{"event": "start", ...}`). A resumed attempt trains
again the steps after its checkpoint, so a `start` event after S completed steps hides the earlier logged steps
from index S on and the other earlier lines (kNN, checkpoints, events) after S: what remains is the history of
the weights that exist.

stats.txt is whatever was written to the run's output, which others may write too: it is streamed line by line,
at most MAX_STATS_BYTES in all (more is refused unread) and MAX_LINE_BYTES a line, and each line must have the form
this project writes (`line_problem`): a line that does not is skipped and reported, so that one bad line neither
hides a run's progress nor reaches the code that formats it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.run.layout import STATS
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from service.storage.untrusted import KiB, MiB, bounded_lines

log = logging.getLogger("barlow")

# 1000 ImageNet epochs at batch 256 logged every 100 steps (the reference's log_every) write 50,000 lines of ~450
# bytes, 22 MB; 64 MiB is ~150,000 lines, ~250 MB once parsed (~1.6 KB a line): status and report stay small
MAX_STATS_BYTES = 64 * MiB
MAX_LINE_BYTES = 64 * KiB  # a line is under 1 KiB (a resume's list of changes a few)
EVENTS = ("start", "checkpoint", "preempted", "end", "diverged")
COUNTS = ("step", "epoch", "total_steps", "steps_per_epoch", "world_size", "global_batch", "train_images",
          "rankme_sample")
CLOCKS = ("time", "wall", "step_time")  # seconds, added and turned into dates: finite and within MAX_SECONDS
MEASURES = ("loss", "loss_on_diag", "loss_off_diag", "lr_weights", "lr_biases", "images_per_s",
            "images_per_s_per_worker", "data_wait", "peak_memory_gib", "embedding_std", "correlation_diagonal",
            "correlation_off_diagonal", "knn_top1", "rankme")
MAX_COUNT = 2**53  # exact as a float: a count times a step time stays a float
MAX_SECONDS = 1e11  # unix time in the year 5138: two of them added still make a date


@dataclass
class RunLog:
    """The lines of a stats.txt that still describe the run, in order, by kind."""

    steps: list[dict[str, Any]] = field(default_factory=list)  # logged steps: {"epoch", "step", "loss", ...}
    knn: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "step", "knn_top1", "time"}
    events: list[dict[str, Any]] = field(default_factory=list)  # {"event": "start" | "checkpoint" | ..., ...}
    other: list[dict[str, Any]] = field(default_factory=list)  # evaluation results, resumes with changes, ...
    skipped: list[str] = field(default_factory=list)  # "line N: why" of each line not of the form this project writes

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


def _number(value: Any) -> bool:
    return isinstance(value, float) or (type(value) is int and abs(value) <= MAX_COUNT)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def line_problem(line: Any) -> str | None:
    """Why a parsed stats.txt line is not of the form this project writes, None when it is: a JSON object whose
    counts (COUNTS) are integers in [0, MAX_COUNT], clocks (CLOCKS) finite seconds in [0, MAX_SECONDS], measures
    (MEASURES) numbers or null, events one of EVENTS with their step (a start with its total_steps), a logged step
    with its step, epoch and loss, a kNN line with its step and accuracy. Other fields are not read."""
    if not isinstance(line, dict):
        return "not a JSON object"
    for key in COUNTS:
        if key in line and not (type(line[key]) is int and 0 <= line[key] <= MAX_COUNT):
            return f"{key} is {_shown(line[key])}, not a count"
    for key in CLOCKS:
        if key in line and not (_number(line[key]) and math.isfinite(line[key]) and 0 <= line[key] <= MAX_SECONDS):
            return f"{key} is {_shown(line[key])}, not a time in seconds"
    for key in MEASURES:
        if key in line and line[key] is not None and not _number(line[key]):
            return f"{key} is {_shown(line[key])}, not a number"
    required: tuple[str, ...]
    if "event" in line:
        required = ("step", "total_steps") if line["event"] == "start" else ("step",)
        if line["event"] not in EVENTS:
            return f"event {_shown(line['event'])} is none of {', '.join(EVENTS)}"
    elif "knn_top1" in line:
        required = ("step", "knn_top1")
    elif "loss" in line and "lr_weights" in line:
        required = ("step", "epoch", "loss")
    else:
        required = ()
    missing = [key for key in required if line.get(key) is None]
    return f"no {missing[0]}" if missing else None


def parse_stats(text: str) -> RunLog:
    """A RunLog from stats.txt's text, later attempts superseding the steps they trained again."""
    return parse_lines(line.encode() for line in text.splitlines())


def parse_lines(lines: Iterable[bytes | None]) -> RunLog:
    """A RunLog from stats.txt's lines (None: a line too long to hold). A line that is not JSON is skipped
    silently (a line cut short by a crash mid-write: the next attempt starts a new one, or an attempt's command
    line); one that is too long, nested too deeply or not of the form this project writes is skipped and listed
    in `skipped`."""
    kept: list[dict[str, Any]] = []
    skipped: list[str] = []
    wall: float | None = None
    for number, raw in enumerate(lines, 1):
        if raw is None:
            skipped.append(f"line {number}: longer than {MAX_LINE_BYTES:,} bytes")
            continue
        raw = raw.strip()
        if not raw.startswith(b"{"):  # empty, or an attempt's command line
            continue
        try:
            line = json.loads(raw)
        except ValueError:  # not JSON (JSONDecodeError) or not UTF-8 (UnicodeDecodeError)
            continue
        except RecursionError:
            skipped.append(f"line {number}: nested too deeply")
            continue
        if (problem := line_problem(line)) is not None:
            skipped.append(f"line {number}: {problem}")
            continue
        if line.get("event") == "start":
            wall = line.get("wall")
            kept = [old for old in kept if "step" not in old or not _retrained(old, line["step"])]
        line["_start"] = wall
        kept.append(line)
    log = RunLog(skipped=skipped)
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
    """The run's stats.txt parsed, or None when it has none yet; read within MAX_STATS_BYTES (UntrustedObject
    beyond) and MAX_LINE_BYTES a line. The lines skipped are reported in one warning."""
    fs, path = filesystem(f"{run_url.rstrip('/')}/{STATS}", storage)
    if not fs.exists(path):
        return None
    run_log = parse_lines(bounded_lines(fs, path, MAX_STATS_BYTES, MAX_LINE_BYTES, "run's stats.txt"))
    if run_log.skipped:
        log.warning("%s/%s: %d line(s) skipped, not of the form this project writes (%s%s)", run_url.rstrip("/"),
                    STATS, len(run_log.skipped), run_log.skipped[0], ", ..." if len(run_log.skipped) > 1 else "")
    return run_log
