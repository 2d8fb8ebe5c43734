"""The run lease against real storage: a local folder, a moto S3 server and fsspec's memory store."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from service.spec import StorageSpec
from service.storage.filesystem import StorageError, filesystem
from service.storage.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord, current_job_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3", "memory"])
def run_url(request, tmp_path):
    if request.param == "s3":
        yield request.getfixturevalue("s3_bucket") + "/runs/test"
    elif request.param == "local":
        yield str(tmp_path / "run")
    else:
        name = f"memory://lease-{time.monotonic_ns()}"
        yield name
        with contextlib.suppress(FileNotFoundError):  # empty once released
            fsspec.filesystem("memory").rm(name.removeprefix("memory://"), recursive=True)


@pytest.fixture
def storage(run_url, request):
    if run_url.startswith("s3://"):
        return StorageSpec(endpoint_url=request.getfixturevalue("s3_server").endpoint_url)
    return StorageSpec()


def stored_record(run_url: str, storage: StorageSpec) -> LeaseRecord | None:
    fs, path = filesystem(run_url, storage)
    try:
        return LeaseRecord.from_json(fs.cat_file(f"{path}/lease.json"))
    except FileNotFoundError:
        return None


def write_lease(run_url: str, storage: StorageSpec, data: bytes) -> None:
    fs, path = filesystem(run_url, storage)
    if not run_url.startswith("s3://"):
        fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/lease.json", data)


def foreign_record(**changes) -> LeaseRecord:
    """Another job's record, from another host (so that only its heartbeat decides whether it is live)."""
    record = LeaseRecord(run_id="run-old", job_id="job-elsewhere", host="pod-elsewhere", pid=41,
                         started="2026-01-01T00:00:00Z", heartbeat=time.time(), token="t-elsewhere")
    return LeaseRecord(**{**record.__dict__, **changes})


def test_second_job_is_refused_with_the_holder_named(run_url, storage):
    with Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300) as first:
        assert first.previous is None
        with pytest.raises(LeaseHeld) as refused:
            Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300)
        message = str(refused.value)
        assert "\n" not in message
        record = first.record
        for part in (run_url, "job job-a", f"host {record.host}", f"pid {record.pid}", f"since {record.started}",
                     "last heartbeat 0 s ago", "300 s old", "--force"):
            assert part in message, (part, message)
        assert refused.value.holder == record
        assert stored_record(run_url, storage) == record  # untouched by the refusal


def test_same_job_reacquires_and_keeps_its_run_id(run_url, storage):
    first = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    first.set_run_id("run-1")
    assert stored_record(run_url, storage).run_id == "run-1"  # written at once

    again = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)  # a torchrun restart of the job
    assert again.previous == first.record
    assert again.record.run_id == "run-1"
    assert again.record.generation == first.record.generation + 1
    assert stored_record(run_url, storage) == again.record
    with pytest.raises(LeaseLost):  # the superseded holder finds out
        first.refresh()
    again.release()
    assert stored_record(run_url, storage) is None


def test_stale_lease_is_taken_over_and_the_old_holder_loses_it(run_url, storage, caplog):
    old = Lease.acquire(run_url, storage, job_id="job-old", timeout_s=300)
    old.set_run_id("run-old")
    time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger="barlow"):
        new = Lease.acquire(run_url, storage, job_id="job-new", timeout_s=0.1)
    assert new.previous == old.record
    assert new.previous.run_id == "run-old" and new.record.run_id is None
    assert stored_record(run_url, storage) == new.record
    assert "taking over" in caplog.text and "job job-old" in caplog.text and "heartbeat" in caplog.text

    assert not old.lost
    with pytest.raises(LeaseLost, match="job job-new"):
        old.refresh()
    assert old.lost
    old.release()  # not ours any more: left alone
    assert stored_record(run_url, storage) == new.record
    new.refresh()
    new.release()


def test_a_lease_with_an_old_heartbeat_is_stale(run_url, storage):
    write_lease(run_url, storage, foreign_record(heartbeat=time.time() - 1000).to_json())
    taken = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    assert taken.previous.job_id == "job-elsewhere" and taken.previous.run_id == "run-old"
    taken.release()

    write_lease(run_url, storage, foreign_record(heartbeat=time.time() - 100).to_json())
    with pytest.raises(LeaseHeld, match="job job-elsewhere on host pod-elsewhere"):
        Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)


def test_force_takes_over_a_live_lease(run_url, storage, caplog):
    live = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    with caplog.at_level(logging.WARNING, logger="barlow"):
        forced = Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300, force=True)
    assert forced.previous == live.record
    assert "forced" in caplog.text and "job job-a" in caplog.text
    with pytest.raises(LeaseLost):
        live.refresh()
    forced.release()


def test_release_deletes_only_our_own_lease(run_url, storage):
    first = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    first.release()
    assert stored_record(run_url, storage) is None

    second = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)  # free again
    assert second.previous is None
    third = Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300, force=True)
    second.release()  # taken by job-b: not deleted
    assert stored_record(run_url, storage) == third.record
    third.release()
    assert stored_record(run_url, storage) is None


def test_release_leaves_a_lease_replaced_behind_its_back(run_url, storage):
    ours = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    other = foreign_record()
    write_lease(run_url, storage, other.to_json())  # not through a Lease: no refresh of ours saw it
    ours.release()
    assert stored_record(run_url, storage) == other


def test_an_unreadable_lease_is_refused_unless_stale_or_forced(run_url, storage):
    write_lease(run_url, storage, b'{"job_id": "half a reco')
    with pytest.raises(LeaseHeld, match="unknown holder") as refused:
        Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    assert "\n" not in str(refused.value) and "--force" in str(refused.value)
    assert refused.value.holder is None
    forced = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300, force=True)
    assert forced.previous is None
    forced.release()

    write_lease(run_url, storage, b"[]")
    time.sleep(0.2)
    stale = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=0.1)  # by the object's modification time
    assert stored_record(run_url, storage) == stale.record
    stale.release()


def test_heartbeat_thread_refreshes_and_notices_a_takeover(run_url, storage):
    lease = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    first = lease.record.heartbeat
    lease.start_heartbeat(0.05)
    deadline = time.monotonic() + 10
    while stored_record(run_url, storage).heartbeat == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stored_record(run_url, storage).heartbeat > first
    assert stored_record(run_url, storage).token == lease.record.token

    Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300, force=True)
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lease.lost
    lease._thread.join(5)
    assert not lease._thread.is_alive()  # a lost lease ends the thread
    assert stored_record(run_url, storage).job_id == "job-b"


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
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
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


RACER = """
import sys
from service.storage.lease import Lease, LeaseHeld
from service.spec import StorageSpec
from service.storage.filesystem import StorageError, filesystem
url, endpoint, job = sys.argv[1:]
storage = StorageSpec(endpoint_url=endpoint or None)
fs, path = filesystem(url, storage)
fs.exists(path)  # connected before the start
print("ready", flush=True)
sys.stdin.readline()
try:
    Lease.acquire(url, storage, job_id=job, timeout_s=300)
    print("won", flush=True)
except LeaseHeld as error:
    print("held", error, flush=True)
sys.stdin.read()  # stay alive (a live holder) until every racer has tried
"""


@pytest.mark.slow
@pytest.mark.parametrize("lease", ["free", "stale"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_processes_wins(where, lease, tmp_path, request):
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/runs/race"
        endpoint = request.getfixturevalue("s3_server").endpoint_url
    else:
        url, endpoint = str(tmp_path / "run"), ""
    if lease == "stale":  # every racer may take it over: the conditional replace picks one
        write_lease(url, StorageSpec(endpoint_url=endpoint or None),
                    foreign_record(heartbeat=time.time() - 1000).to_json())
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url, endpoint, f"job-{n}"], cwd=REPO, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE) for n in range(10)]
    try:
        assert [racer.stdout.readline() for racer in racers] == ["ready\n"] * 10
        for racer in racers:
            racer.stdin.write("go\n")
        for racer in racers:
            racer.stdin.flush()
        results = [racer.stdout.readline() for racer in racers]
    finally:
        for racer in racers:
            racer.stdin.close()
            racer.wait(30)
    winners = [n for n, result in enumerate(results) if result == "won\n"]
    assert len(winners) == 1, results
    assert all(result.startswith(f"held {url} is in use by job job-{winners[0]} ") for n, result in
               enumerate(results) if n != winners[0]), results
    assert stored_record(url, StorageSpec(endpoint_url=endpoint or None)).job_id == f"job-{winners[0]}"


def test_unusable_storage_is_a_storage_error(s3_server, aws_env):
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url, retries=0)
    with pytest.raises(StorageError, match="s3://no-such-bucket/run: the bucket or folder does not exist"):
        Lease.acquire("s3://no-such-bucket/run", storage, job_id="job-a", timeout_s=300)


def test_a_vanished_lease_is_written_again_unless_another_job_took_it(run_url, storage):
    fs, path = filesystem(run_url, storage)
    lease = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
    fs.rm_file(f"{path}/lease.json")  # deleted by hand, or a store that lost its data
    lease.refresh()
    assert not lease.lost and LeaseRecord.from_json(fs.cat_file(f"{path}/lease.json")).token == lease.record.token
    fs.rm_file(f"{path}/lease.json")
    other = Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300)  # the output was free: taken
    with pytest.raises(LeaseLost, match="job job-b"):
        lease.refresh()
    assert lease.lost
    other.release()
