"""The run lease against a moto S3 server, and processes racing for one lease on a local folder and on S3 (the
cases on a local folder and fsspec's memory store in this process: tests/unit/run/test_lease.py)."""

import os
import subprocess
import sys
import time

import pytest

from service.errors import StorageError
from service.run.lease import Lease
from service.spec import StorageSpec
from tests.support.lease_cases import LeaseCases, foreign_record, stored_record, write_lease
from tests.support.runs import ROOT
from tests.support.s3_server import TEST_CREDENTIALS


class TestS3Store(LeaseCases):
    @pytest.fixture
    def run_url(self, s3_bucket):
        return s3_bucket + "/runs/test"

    @pytest.fixture
    def storage(self, s3_server):
        return StorageSpec(endpoint_url=s3_server.endpoint_url)


# One racer: for each race, a line "URL ENDPOINT" ("-": none), "ready" once connected, a line "go", then "won" or
# "held MESSAGE". It stays alive, a live holder of what it won, until its input ends.
RACER = """
import sys
from service.run.lease import Lease, LeaseHeld
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
job = sys.argv[1]
for race in iter(sys.stdin.readline, ""):
    url, endpoint = race.split()
    storage = StorageSpec(endpoint_url=None if endpoint == "-" else endpoint)
    fs, path = filesystem(url, storage)
    fs.exists(path)  # connected before the start
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        Lease.acquire(url, storage, job_id=job, timeout_s=300)
        print("won", flush=True)
    except LeaseHeld as error:
        print("held", error, flush=True)
"""
RACERS = 10


@pytest.fixture(scope="module")
def racers():
    """Ten racer processes, started once (each imports the service) for every race of this module."""
    env = {**os.environ, **TEST_CREDENTIALS, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent"}
    processes = [subprocess.Popen([sys.executable, "-c", RACER, f"job-{n}"], cwd=ROOT, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for n in range(RACERS)]
    yield processes
    for process in processes:
        process.stdin.close()
    for process in processes:
        process.wait(30)


def race(racers: list[subprocess.Popen], url: str, endpoint: str) -> list[str]:
    """Each racer's answer once all of them, connected, are told to go at once."""
    for racer in racers:
        racer.stdin.write(f"{url} {endpoint or '-'}\n")
        racer.stdin.flush()
    assert [racer.stdout.readline() for racer in racers] == ["ready\n"] * len(racers)
    for racer in racers:
        racer.stdin.write("go\n")
    for racer in racers:
        racer.stdin.flush()
    return [racer.stdout.readline() for racer in racers]


@pytest.mark.slow
@pytest.mark.parametrize("lease", ["free", "stale"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_processes_wins(where, lease, tmp_path, request, racers):
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/runs/race"
        endpoint = request.getfixturevalue("s3_server").endpoint_url
    else:
        url, endpoint = str(tmp_path / "run"), ""
    if lease == "stale":  # every racer may take it over: the conditional replace picks one
        write_lease(url, StorageSpec(endpoint_url=endpoint or None),
                    foreign_record(heartbeat=time.time() - 1000).to_json())
    results = race(racers, url, endpoint)
    winners = [n for n, result in enumerate(results) if result == "won\n"]
    assert len(winners) == 1, results
    assert all(result.startswith(f"held {url} is in use by job job-{winners[0]} ") for n, result in
               enumerate(results) if n != winners[0]), results
    assert stored_record(url, StorageSpec(endpoint_url=endpoint or None)).job_id == f"job-{winners[0]}"


def test_unusable_storage_is_a_storage_error(s3_server, aws_env):
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url, retries=0)
    with pytest.raises(StorageError, match="s3://no-such-bucket/run: the bucket or folder does not exist"):
        Lease.acquire("s3://no-such-bucket/run", storage, job_id="job-a", timeout_s=300)
