"""The run lease in this process, on a local folder and fsspec's memory store (the same cases on a moto S3
server, and processes racing for one lease: tests/integration/test_lease.py)."""

import contextlib
import json
import logging
import os
import socket
import time

import fsspec
import pytest

from service.run.lease import Lease, LeaseHeld, LeaseRecord, current_job_id
from service.spec import StorageSpec
from tests.support.lease_cases import LeaseCases, foreign_record, write_lease


class TestLocalAndMemoryStores(LeaseCases):
    @pytest.fixture(params=["local", "memory"])
    def run_url(self, request, tmp_path):
        if request.param == "local":
            yield str(tmp_path / "run")
        else:
            name = f"memory://lease-{time.monotonic_ns()}"
            yield name
            with contextlib.suppress(FileNotFoundError):  # empty once released
                fsspec.filesystem("memory").rm(name.removeprefix("memory://"), recursive=True)

    @pytest.fixture
    def storage(self):
        return StorageSpec()


def test_heartbeat_survives_storage_failures(tmp_path, caplog):
    lease = Lease.acquire(str(tmp_path / "run"), StorageSpec(), job_id="job-a", timeout_s=300)
    store = lease._store
    real_replace, failures = store.replace, []

    def flaky_replace(data, version):
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("storage unreachable")
        return real_replace(data, version)

    store.replace = flaky_replace
    first = lease.record.heartbeat
    with caplog.at_level(logging.WARNING, logger="barlow"):
        lease.start_heartbeat(0.02)
        deadline = time.monotonic() + 10
        while lease.record.heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lease.record.heartbeat > first and not lease.lost
    assert caplog.text.count("lease heartbeat failed") == 2
    lease.release()
    assert not lease._thread.is_alive()
    assert not (tmp_path / "run" / "lease.json").exists()


def test_a_dead_holder_on_this_host_is_stale_at_once(tmp_path):
    dead = os.fork()  # a child that ends at once, reaped: its pid names no live process
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    run = str(tmp_path / "run")
    here = foreign_record(job_id="job-dead", host=socket.gethostname(), pid=dead,
                          pid_namespace=os.stat("/proc/self/ns/pid").st_ino)
    write_lease(run, StorageSpec(), here.to_json())
    taken = Lease.acquire(run, StorageSpec(), job_id="job-a", timeout_s=300)
    assert taken.previous.job_id == "job-dead"
    taken.release()

    # another pid namespace (another container with the same host name): its pid means nothing here
    write_lease(run, StorageSpec(), foreign_record(**{**here.__dict__, "pid_namespace": -1}).to_json())
    with pytest.raises(LeaseHeld, match="job job-dead"):
        Lease.acquire(run, StorageSpec(), job_id="job-a", timeout_s=300)


def test_local_path_and_file_url_are_the_same_lease(tmp_path):
    with Lease.acquire(str(tmp_path / "run"), StorageSpec(), job_id="job-a", timeout_s=300):
        assert json.loads((tmp_path / "run" / "lease.json").read_text())["job_id"] == "job-a"
        with pytest.raises(LeaseHeld):
            Lease.acquire(f"file://{tmp_path}/run", StorageSpec(), job_id="job-b", timeout_s=300)
    assert not (tmp_path / "run" / "lease.json").exists()


def test_current_job_id(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    own = current_job_id()
    assert own == current_job_id() and len(own) == 32  # one per process
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a-job")
    assert current_job_id() == "3f2a-job"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id names no job
    assert current_job_id() == own


def test_record_round_trips_and_rejects_what_is_not_one():
    record = foreign_record(generation=3, pid_namespace=7)
    assert LeaseRecord.from_json(record.to_json()) == record
    assert LeaseRecord.from_json(json.dumps({**record.__dict__, "later": 1}).encode()) == record
    for bad in (b"", b"[]", b"{}", json.dumps({**record.__dict__, "pid": "41"}).encode()):
        with pytest.raises(ValueError):
            LeaseRecord.from_json(bad)
