"""A run's progress read from its storage: `barlow status` and `barlow runs ls`.

Everything comes from what the run writes under run.output (stats.txt, lease.json, spec.yaml, checkpoints/), so it
works the same for a laptop run, a TorchX job and a run whose job is long gone. A remote run uploads stats.txt
every run.sync_every_seconds, at each checkpoint and at the end: the time of its last line says how fresh it is.

States: `running` (lease.json held with a heartbeat younger than checkpoint.lease_timeout), `finished` (the last
event is "end"), `preempted` (SIGTERM: saved and stopped, resumable), `failed` (stopped on a non-finite loss),
`stopped` (none of these: killed or crashed; the same command resumes it), `not started` (no stats.txt yet).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from service.checkpoint.catalog import CheckpointInfo, list_checkpoints
from service.errors import SpecError, StorageError
from service.reports.run_log import RunLog, read_run_log
from service.run.layout import SPEC, STATS
from service.run.lease import LEASE_FILE, LEASE_LIMIT, LeaseRecord
from service.spec import MAX_SPEC_BYTES, CheckpointSpec, StorageSpec, safe_yaml
from service.storage.filesystem import explain, filesystem, is_remote, storage_errors
from service.storage.untrusted import UntrustedObject, read_bounded

log = logging.getLogger("barlow")

ETA_LINES = 5  # the ETA's step time: the mean over this many of the newest logged lines of the current attempt


class NoRun(StorageError):
    """Nothing of a run is stored at the URL (no stats.txt, spec.yaml or lease.json)."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands, as its storage says. None: not known (not logged yet, or by an older trainer)."""

    run: str
    state: str
    detail: str  # why the state: the lease's holder and heartbeat, the step that diverged, ...
    step: int | None  # steps completed
    total: int | None  # steps the run trains in all (its newest attempt's total_steps)
    epoch: int | None  # epoch of the step completed (0-based, as stats.txt)
    loss: float | None
    knn_top1: float | None  # percent
    images_per_s: float | None
    eta_s: float | None  # only while running
    checkpoint: CheckpointInfo | None  # the newest valid one
    updated: float | None  # unix time of the last line of stats.txt


def read_progress(run_url: str, storage: StorageSpec, now: float | None = None) -> Progress:
    """The progress of the run at `run_url`. NoRun when nothing of a run is there; StorageError when the storage
    cannot be read (missing bucket, credentials, endpoint)."""
    now = time.time() if now is None else now
    try:
        fs, path = filesystem(run_url, storage)
        log = read_run_log(run_url, storage)
        spec_text = _read(fs, f"{path.rstrip('/')}/{SPEC}", MAX_SPEC_BYTES, "spec")
        lease_data = _read(fs, f"{path.rstrip('/')}/{LEASE_FILE}", LEASE_LIMIT, "lease record")
        if log is None and spec_text is None and lease_data is None:
            _require_bucket(run_url, fs, path)
            raise NoRun(f"{run_url}: no run here (no {STATS}, {SPEC} or {LEASE_FILE}): check the URL (a run's "
                        "run.output); `barlow runs ls URL` lists the runs under a prefix")
        checkpoints = list_checkpoints(run_url, storage)
    except storage_errors() as error:
        raise StorageError(explain(run_url, error)) from None
    log = log or RunLog()
    state, detail = _state(log, lease_data, _lease_timeout(spec_text, f"{run_url.rstrip('/')}/{SPEC}"), now)
    step, epoch = _position(log)
    total = log.starts[-1]["total_steps"] if log.starts else None
    last = log.last_step
    valid = [checkpoint for checkpoint in checkpoints if checkpoint.valid]
    times = [log.wall_clock(line) for line in (*log.steps, *log.knn, *log.events, *log.other)]
    return Progress(
        run=run_url, state=state, detail=detail, step=step, total=total, epoch=epoch,
        loss=last["loss"] if last else None, knn_top1=log.knn[-1]["knn_top1"] if log.knn else None,
        images_per_s=last.get("images_per_s") if last else None,
        eta_s=_eta(log, step, total) if state == "running" else None,
        checkpoint=valid[-1] if valid else None,
        updated=max((t for t in times if t is not None), default=None),
    )


def find_runs(url: str, storage: StorageSpec) -> list[str]:
    """The runs at `url` and in its immediate sub-folders (folders holding stats.txt or spec.yaml), by name.
    StorageError when the bucket or the local folder does not exist."""
    base = url.rstrip("/")
    try:
        fs, path = filesystem(base, storage)
        path = path.rstrip("/")
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:  # on object stores, also an empty prefix of an existing bucket
            _require_bucket(url, fs, path)
            if not is_remote(url):
                raise StorageError(f"{url}: no such folder") from None
            return []
        names = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["type"] for entry in entries}
        runs = [base] if {STATS, SPEC} & names.keys() else []
        for name, kind in sorted(names.items()):
            if kind == "directory":
                inside = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(f"{path}/{name}", detail=False)}
                if {STATS, SPEC} & inside:
                    runs.append(f"{base}/{name}")
    except storage_errors() as error:
        raise StorageError(explain(url, error)) from None
    return runs


def print_runs(url: str, storage: StorageSpec) -> int:
    """`barlow runs ls URL`: one aligned row per run, the most recently updated first. A run whose files are not
    what this project writes (UntrustedObject) is listed as `unreadable`, its reason on standard error, and the
    exit status is 1."""
    runs, unreadable = [], 0
    for run in find_runs(url, storage):
        try:
            runs.append(read_progress(run, storage))
        except UntrustedObject as error:
            print(f"barlow: {error}", file=sys.stderr)
            runs.append(Progress(run, "unreadable", str(error), *[None] * 9))  # nothing else known
            unreadable += 1
    if not runs:
        print(f"no runs under {url}")
        return 0
    runs.sort(key=lambda progress: progress.run)
    runs.sort(key=lambda progress: -(progress.updated or 0))
    rows = [("RUN", "STATE", "STEP", "EPOCH", "LOSS", "KNN", "IMAGES/S", "ETA", "CHECKPOINT", "UPDATED")]
    for progress in runs:
        rows.append((progress.run, progress.state, _steps(progress), _value(progress.epoch),
                     _number(progress.loss), _percent(progress.knn_top1), _number(progress.images_per_s),
                     _duration(progress.eta_s), _value(progress.checkpoint and progress.checkpoint.step),
                     _when(progress.updated)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 1 if unreadable else 0


def format_status(progress: Progress, now: float | None = None) -> str:
    """The lines of `barlow status` for one run."""
    now = time.time() if now is None else now
    checkpoint = progress.checkpoint
    percent = f" ({100 * progress.step / progress.total:.0f}%)" if progress.step is not None and progress.total else ""
    created = (checkpoint.manifest or {}).get("created", "-") if checkpoint else "-"
    updated = _when(progress.updated)
    if progress.updated is not None:
        updated += f" ({_duration(now - progress.updated)} ago)"
    rows = [
        ("run", progress.run),
        ("state", f"{progress.state}{': ' + progress.detail if progress.detail else ''}"),
        ("step", f"{_steps(progress)}{percent}, epoch {_value(progress.epoch)}"),
        ("loss", _number(progress.loss)),
        ("kNN top-1", _percent(progress.knn_top1)),
        ("images/s", _number(progress.images_per_s)),
        ("ETA", _duration(progress.eta_s)),
        ("checkpoint", f"step {checkpoint.step}, {checkpoint.url}, created {created}" if checkpoint else "-"),
        ("last line", updated),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _read(fs: Any, path: str, limit: int, what: str) -> bytes | None:
    """The object at `path` (None when absent), within `limit` bytes (UntrustedObject beyond)."""
    try:
        return read_bounded(fs, path, limit, what)
    except FileNotFoundError:
        return None


def _require_bucket(url: str, fs: Any, path: str) -> None:
    """StorageError naming `url` when it is on an object store whose bucket is missing."""
    if is_remote(url) and path.strip("/"):
        try:
            fs.info(path.strip("/").split("/", 1)[0])
        except FileNotFoundError as error:
            raise StorageError(explain(url, error)) from None


def _lease_timeout(spec_text: bytes | None, url: str) -> float:
    """The run's checkpoint.lease_timeout from its spec.yaml (read with the spec's bounded YAML loader); the
    default where the spec has none (an older trainer's), and, with a warning, where the file is not a spec."""
    default = float(CheckpointSpec.model_fields["lease_timeout"].default)
    if spec_text is None:
        return default
    try:
        return float(safe_yaml(spec_text, url)["checkpoint"]["lease_timeout"])
    except KeyError:
        return default
    except SpecError as error:
        why = str(error)
    except (TypeError, ValueError, OverflowError):
        why = f"{url}: not a spec with a number for checkpoint.lease_timeout"
    log.warning("%s; the lease's timeout is taken as the default, %g s", why, default)
    return default


def _state(log: RunLog, lease_data: bytes | None, timeout_s: float, now: float) -> tuple[str, str]:
    stale = ""
    if lease_data is not None:
        try:
            holder = LeaseRecord.from_json(lease_data)
        except ValueError as error:  # from_json's one error, nested brackets and oversize included
            stale = f"; {LEASE_FILE} is unreadable ({error})"
        else:
            age = now - holder.heartbeat
            who = f"job {holder.job_id} on host {holder.host} (pid {holder.pid}), heartbeat {age:.0f} s ago"
            if age <= timeout_s:
                return "running", who
            stale = f"; {LEASE_FILE} left by {who}, more than its timeout {timeout_s:g} s"
    last = log.events[-1] if log.events else {}
    kind = last.get("event")
    if kind == "end":
        return "finished", stale.removeprefix("; ")
    if kind == "preempted":
        return "preempted", f"stopped by SIGTERM after step {last['step']}, checkpoint saved{stale}"
    if kind == "diverged":
        return "failed", f"the loss became non-finite at step {last['step']}{stale}"
    if not log.steps and not log.events:
        return "not started", stale.removeprefix("; ")
    return "stopped", f"no end event: killed or crashed; the same command resumes it{stale}"


def _position(log: RunLog) -> tuple[int | None, int | None]:
    """Steps completed and the epoch, from the newest line with a step: a logged line's step is the step it
    trained (0-based, so one more is completed); events and the kNN monitor count completed steps."""
    candidates = [(line["step"] + 1, line["epoch"]) for line in log.steps[-1:]]
    candidates += [(line["step"], line.get("epoch")) for line in (*log.knn[-1:], *log.events) if "step" in line]
    if not candidates:
        return None, None
    step, epoch = max(candidates, key=lambda candidate: candidate[0])
    starts = log.starts
    if starts and starts[-1].get("steps_per_epoch"):
        epoch = step // starts[-1]["steps_per_epoch"]
    return step, epoch


def _eta(log: RunLog, step: int | None, total: int | None) -> float | None:
    """(total - step) x the mean step time of the newest logged lines of the current attempt."""
    if step is None or total is None or not log.starts:
        return None
    attempt = log.starts[-1]["_start"]
    times = [line["step_time"] for line in log.steps if line.get("_start") == attempt and "step_time" in line]
    if not times:
        return None
    recent = times[-ETA_LINES:]
    return max(total - step, 0) * sum(recent) / len(recent)


def _value(value: object) -> str:
    return "-" if value is None else str(value)


def _steps(progress: Progress) -> str:
    return f"{_value(progress.step)}/{_value(progress.total)}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
