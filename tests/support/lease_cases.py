"""What a run lease does on every store (a local folder, fsspec's memory store, a moto S3 server): the tests of
`LeaseCases` run once per store, in the test classes that give its `run_url` and `storage` fixtures
(tests/unit/run/test_lease.py: local and memory; tests/integration/test_lease.py: S3)."""

from __future__ import annotations

import logging
import time

import pytest

from service.run.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord
from service.spec import StorageSpec
from service.storage.filesystem import filesystem


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


class LeaseCases:
    """The lease on one kind of store; a subclass named Test... gives the fixtures `run_url` (a run's location
    there) and `storage` (its settings)."""

    def test_second_job_is_refused_with_the_holder_named(self, run_url, storage):
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

    def test_same_job_reacquires_and_keeps_its_run_id(self, run_url, storage):
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

    def test_stale_lease_is_taken_over_and_the_old_holder_loses_it(self, run_url, storage, caplog):
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

    def test_a_lease_with_an_old_heartbeat_is_stale(self, run_url, storage):
        write_lease(run_url, storage, foreign_record(heartbeat=time.time() - 1000).to_json())
        taken = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
        assert taken.previous.job_id == "job-elsewhere" and taken.previous.run_id == "run-old"
        taken.release()

        write_lease(run_url, storage, foreign_record(heartbeat=time.time() - 100).to_json())
        with pytest.raises(LeaseHeld, match="job job-elsewhere on host pod-elsewhere"):
            Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)

    def test_force_takes_over_a_live_lease(self, run_url, storage, caplog):
        live = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
        with caplog.at_level(logging.WARNING, logger="barlow"):
            forced = Lease.acquire(run_url, storage, job_id="job-b", timeout_s=300, force=True)
        assert forced.previous == live.record
        assert "forced" in caplog.text and "job job-a" in caplog.text
        with pytest.raises(LeaseLost):
            live.refresh()
        forced.release()

    def test_release_deletes_only_our_own_lease(self, run_url, storage):
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

    def test_release_leaves_a_lease_replaced_behind_its_back(self, run_url, storage):
        ours = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
        other = foreign_record()
        write_lease(run_url, storage, other.to_json())  # not through a Lease: no refresh of ours saw it
        ours.release()
        assert stored_record(run_url, storage) == other

    def test_an_unreadable_lease_is_refused_unless_stale_or_forced(self, run_url, storage):
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

    @pytest.mark.parametrize("hostile, problem", [
        (b"[" * 30_000 + b"]" * 30_000, "not JSON (RecursionError)"),
        (b"{" + b" " * (1 << 20) + b"}", "more than 65,536 bytes, not a lease record"),
    ], ids=["nested", "1-MiB"])
    def test_a_hostile_lease_is_read_bounded_and_can_be_taken_over(self, run_url, storage, hostile, problem):
        """Nested brackets or a lease.json of any size: one line naming the problem, never read whole; the
        conditional replacement of a forced takeover still matches what was read."""
        write_lease(run_url, storage, hostile)
        with pytest.raises(LeaseHeld, match="unknown holder") as refused:
            Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300)
        assert problem in str(refused.value) and "\n" not in str(refused.value)
        forced = Lease.acquire(run_url, storage, job_id="job-a", timeout_s=300, force=True)
        assert stored_record(run_url, storage) == forced.record
        forced.release()

    def test_heartbeat_thread_refreshes_and_notices_a_takeover(self, run_url, storage):
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

    def test_a_vanished_lease_is_written_again_unless_another_job_took_it(self, run_url, storage):
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
