"""One run owns an output: a lease object, RUN_URL/lease.json, held by the job that writes there.

A job acquires the lease before it writes anything under RUN_URL, keeps it alive with a heartbeat, and releases it
when it ends. A second job pointed at the same output is refused (`LeaseHeld`, naming the holder) while the
holder's heartbeat is fresh; the same job (a torchrun restart of the worker group: same `current_job_id()`)
re-acquires it at once; a crashed holder's lease is taken over once its heartbeat is older than the timeout (or at
once with `force`, or when it is on this host, in this pid namespace, and its pid is gone). A holder whose lease was
taken over finds out at its next refresh (`LeaseLost`, `Lease.lost`) and must stop writing.

Every write is conditional (service/storage/conditional.py: an S3 ETag, an flock, or best effort elsewhere), so two
takers cannot both win.

Staleness compares the holder's heartbeat (its clock) with ours: clocks must agree to well within the timeout
(NTP does). An unreadable lease.json counts as held by an unknown holder, stale by the object's modification time.
Acquire the lease in one process of a job (rank 0), not in every worker.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch.distributed as dist

from service.errors import CheckpointError, StorageError
from service.run import layout
from service.runtime.distributed import Worker, new_cpu_group
from service.spec import StorageSpec
from service.storage.conditional import Conflict, Store, Stored, store_for
from service.storage.filesystem import check_writable, explain, filesystem

log = logging.getLogger("barlow")

LEASE_FILE = layout.LEASE
LEASE_LIMIT = 64 << 10  # a lease record is ~300 bytes; every store reads at most this much more than it


class LeaseHeld(RuntimeError):
    """Another live job holds the output's lease; the message names it and says what to do. `holder`: its record,
    None when lease.json is unreadable."""

    def __init__(self, message: str, holder: LeaseRecord | None = None):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """Our lease was taken over or removed: this job no longer owns the output and must stop writing there."""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of lease.json: who holds the output, and since when."""

    run_id: str | None
    job_id: str
    host: str
    pid: int
    started: str  # ISO 8601 UTC, when this holder acquired the lease
    heartbeat: float  # unix time of the holder's last write
    generation: int = 1  # +1 at every acquisition: a fencing number, constant while one holder refreshes
    token: str = ""  # unique to one acquisition: tells two holders of the same job apart
    pid_namespace: int | None = None  # with host: where `pid` means something

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        """Parse lease.json; ValueError when it is not a lease record."""
        if len(data) > LEASE_LIMIT:
            raise ValueError(f"more than {LEASE_LIMIT:,} bytes, not a lease record")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            raise ValueError(f"not JSON ({type(error).__name__})") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        known = {field.name for field in fields(cls)}
        try:
            record = cls(**{key: item for key, item in value.items() if key in known})
        except TypeError as error:
            raise ValueError(str(error)) from None
        if not (isinstance(record.job_id, str) and isinstance(record.host, str) and type(record.pid) is int
                and isinstance(record.heartbeat, (int, float)) and type(record.generation) is int):
            raise ValueError("a field has the wrong type")
        return record


def current_job_id() -> str:
    """This job's id: TORCHELASTIC_RUN_ID under torchrun (the same for every worker, every restart of the worker
    group and every re-rendezvous of one elastic job), else an id of this process. torchrun's default `--rdzv-id`,
    "none", names no job and counts as unset."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return run_id if run_id and run_id != "none" else _PROCESS_JOB_ID


class Lease:
    """A held lease on RUN_URL/lease.json. Get one with `Lease.acquire`; use it as a context manager or call
    `release()`."""

    def __init__(self, run_url: str, store: Store, record: LeaseRecord, version: Any,
                 previous: LeaseRecord | None):
        self.run_url = run_url
        self.record = record  # ours, as last written
        self.previous = previous  # the record we replaced; None if the lease was free (or unreadable)
        self._store = store
        self._version = version  # what the store's conditional write compares with
        self._lost = False
        self._released = False
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_url: str, storage: StorageSpec, *, job_id: str, timeout_s: float,
                force: bool = False) -> Lease:
        """Take the lease of `run_url` for `job_id`: create it if free; replace it if it is this job's (keeping its
        run_id), stale (heartbeat older than `timeout_s`) or `force`; else raise LeaseHeld. StorageError when the
        storage cannot be used."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        fs, path = filesystem(run_url, storage)
        store = store_for(fs, f"{path.rstrip('/')}/{LEASE_FILE}", LEASE_LIMIT)
        token = uuid.uuid4().hex
        try:
            for _ in range(10):  # each pass loses only to a concurrent write; the next one reads the winner
                stored = store.read()
                now = time.time()
                if stored is None:
                    record = _new_record(job_id, token, None, generation=1, now=now)
                    with contextlib.suppress(Conflict):
                        return cls(run_url, store, record, store.create(record.to_json()), None)
                    continue
                holder, problem = _parse(stored.data)
                if holder is not None and holder.token == token:  # our own write, its reply lost
                    return cls(run_url, store, holder, stored.version, None)
                if holder is not None and holder.job_id == job_id:
                    log.info("%s: re-acquiring the lease of job %s (pid %d on %s)", run_url, job_id, holder.pid,
                             holder.host)
                    run_id = holder.run_id
                else:
                    reason = "forced" if force else _stale(holder, stored, timeout_s, now)
                    if reason is None:
                        raise LeaseHeld(_held_message(run_url, holder, problem, stored, timeout_s, now), holder)
                    log.warning("%s: taking over the lease (%s) from %s", run_url, reason,
                                _describe(holder, problem, stored, now))
                    run_id = None
                generation = (holder.generation if holder else 0) + 1
                record = _new_record(job_id, token, run_id, generation=generation, now=now)
                with contextlib.suppress(Conflict):
                    return cls(run_url, store, record, store.replace(record.to_json(), stored.version), holder)
            raise StorageError(f"{run_url}: {LEASE_FILE} keeps changing under us; try again")
        except OSError as error:
            raise StorageError(explain(run_url, error)) from None

    @property
    def lost(self) -> bool:
        """True once a refresh found the lease taken over or removed."""
        return self._lost

    def set_run_id(self, run_id: str) -> None:
        """Record the run's id in the lease, written at once (or, if storage is unreachable now, at the next
        heartbeat). LeaseLost if the lease is no longer ours."""
        with self._write_lock:
            self.record = replace(self.record, run_id=run_id)
        try:
            self.refresh()
        except StorageError as error:
            log.warning("%s; the run id goes with the next heartbeat", error)

    def refresh(self) -> None:
        """Rewrite the heartbeat, only if the stored lease is still ours. LeaseLost (and `lost`) if it is not;
        StorageError if the storage cannot be reached (the lease stays ours until the timeout)."""
        with self._write_lock:
            if self._lost:
                raise LeaseLost(f"{self.run_url}: the lease was lost before; this job no longer owns the output")
            if self._released:
                raise LeaseLost(f"{self.run_url}: the lease was released")
            record = replace(self.record, heartbeat=time.time())
            try:
                try:
                    self._version = self._store.replace(record.to_json(), self._version)
                except Conflict:
                    stored = self._store.read()
                    if stored is None:  # deleted, and nobody took it since: ours again (a create fails if taken)
                        self._version = self._store.create(record.to_json())
                        log.warning("%s: %s had vanished; written again", self.run_url, LEASE_FILE)
                    else:
                        holder = _parse(stored.data)[0]
                        if holder is None or holder.token != self.record.token:
                            self._lost = True
                            raise LeaseLost(_lost_message(self.run_url, holder)) from None
                        # ours, at a version we did not see (a retried write whose reply was lost): write over it
                        self._version = self._store.replace(record.to_json(), stored.version)
            except Conflict:
                self._lost = True
                raise LeaseLost(f"{self.run_url}: the lease changed while it was being refreshed; this job no "
                                "longer owns the output") from None
            except OSError as error:
                raise StorageError(explain(self.run_url, error)) from None
            self.record = record

    def start_heartbeat(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds in a daemon thread until `release()`. Storage failures are logged and
        retried at the next beat; a lease taken by someone else sets `lost` and ends the thread."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        if self._thread is not None:
            raise RuntimeError("the heartbeat is already running")
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="barlow-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete lease.json if it is still ours (it is left alone otherwise). Storage
        failures are logged: the lease then expires after its timeout."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._write_lock:
            if self._released or self._lost:
                self._released = True
                return
            self._released = True
            try:
                self._store.delete(self._version)
            except Conflict:
                log.warning("%s: the lease is no longer ours; left in place", self.run_url)
            except Exception as error:  # noqa: BLE001 - releasing runs at the end of every run, even a failed one
                log.warning("%s: could not release the lease (%s); it expires with its heartbeat",
                            self.run_url, explain(self.run_url, error))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except LeaseLost as error:
                if not self._released:
                    log.error("%s", error)
                return
            except Exception as error:  # noqa: BLE001 - the thread must outlive any storage failure
                log.warning("lease heartbeat failed (%s); retrying in %g s", error, interval_s)


def own_output(run_url: str, storage: StorageSpec, worker: Worker, *, timeout_s: float, force: bool = False
               ) -> tuple[Lease | None, Any]:
    """What a run does before it writes anything under `run_url`: check (on every rank) that its checkpoints/ can
    be written, then take its lease (take_lease). Returns the lease and the gloo group of the run's checkpoint and
    lease collectives, off the training step's (None in a world of one)."""
    check_writable(layout.checkpoints_url(run_url), storage)
    group = new_cpu_group()
    return take_lease(run_url, storage, worker, group, timeout_s=timeout_s, force=force), group


def take_lease(run_url: str, storage: StorageSpec, worker: Worker, group: Any, *, timeout_s: float,
               force: bool = False) -> Lease | None:
    """The run's lease for this job, taken by rank 0 with its heartbeat started (None on the other ranks). Every
    rank learns the outcome through `group` (gloo; None in a world of one) and all fail alike, with a
    CheckpointError naming the holder, when it is held or the storage cannot be used: none is left waiting in a
    collective. The caller releases it when the run ends."""
    lease, refusal = None, None
    if worker.is_main:
        try:
            lease = Lease.acquire(run_url, storage, job_id=current_job_id(), timeout_s=timeout_s, force=force)
            lease.start_heartbeat(timeout_s / 4)
        except (LeaseHeld, StorageError) as error:
            refusal = str(error)
    if group is not None:
        message = [refusal]
        dist.broadcast_object_list(message, src=0, group=group)
        refusal = message[0]
    if refusal:
        raise CheckpointError(refusal)
    return lease


# ---------------------------------------------------------------------------------------------------------------
# records and messages

_PROCESS_JOB_ID = uuid.uuid4().hex
_HOST = socket.gethostname()


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _new_record(job_id: str, token: str, run_id: str | None, *, generation: int, now: float) -> LeaseRecord:
    started = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return LeaseRecord(run_id=run_id, job_id=job_id, host=_HOST, pid=os.getpid(), started=started, heartbeat=now,
                       generation=generation, token=token, pid_namespace=_pid_namespace())


def _parse(data: bytes) -> tuple[LeaseRecord | None, str | None]:
    try:
        return LeaseRecord.from_json(data), None
    except ValueError as error:
        return None, str(error)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        return False
    return False


def _stale(holder: LeaseRecord | None, stored: Stored, timeout_s: float, now: float) -> str | None:
    """Why the lease may be taken over, or None while it is live."""
    if holder is None:
        if stored.modified is not None and now - stored.modified > timeout_s:
            return f"unreadable, last written {now - stored.modified:.0f} s ago, more than {timeout_s:g} s"
        return None
    if now - holder.heartbeat > timeout_s:
        return f"heartbeat {now - holder.heartbeat:.0f} s old, more than {timeout_s:g} s"
    if (holder.host == _HOST and holder.pid_namespace is not None and holder.pid_namespace == _pid_namespace()
            and _pid_gone(holder.pid)):
        return f"its pid {holder.pid} is gone from this host"
    return None


def _age(seconds: float) -> str:
    return f"{max(seconds, 0):.0f} s"


def _describe(holder: LeaseRecord | None, problem: str | None, stored: Stored, now: float) -> str:
    if holder is None:
        written = f", last written {_age(now - stored.modified)} ago" if stored.modified is not None else ""
        return f"an unknown holder ({LEASE_FILE} is unreadable: {problem}){written}"
    return (f"job {holder.job_id} on host {holder.host} (pid {holder.pid}) since {holder.started}, "
            f"last heartbeat {_age(now - holder.heartbeat)} ago")


def _held_message(run_url: str, holder: LeaseRecord | None, problem: str | None, stored: Stored,
                  timeout_s: float, now: float) -> str:
    if holder is None and stored.modified is None:
        then = "with --force"
    else:
        then = f"after its {'heartbeat' if holder else 'lease'} is {timeout_s:g} s old or with --force"
    return (f"{run_url} is in use by {_describe(holder, problem, stored, now)}: wait for it to end, "
            f"or if it is dead, rerun {then}")


def _lost_message(run_url: str, holder: LeaseRecord | None) -> str:
    if holder is None:
        taken = f"{LEASE_FILE} was overwritten with something unreadable"
    else:
        taken = f"job {holder.job_id} on host {holder.host} (pid {holder.pid}) took it over at {holder.started}"
    return f"{run_url}: lease lost, {taken}; this job no longer owns the output and must stop writing there"
