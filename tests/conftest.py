"""Fixtures every kind of test may use: the moto S3 server (one per test session), its credentials, new buckets.

Where a test lives says what it needs (`tests/unit`: one module, in process; `tests/integration`: a module with its
real neighbours, the S3 server or loader processes; `tests/e2e`: what a user types, in subprocesses;
`tests/distributed`: torchrun workers; `tests/container`: the image under podman). The markers say it too, so that
`-m "not container"` and the like select across folders; the S3 marker is set here from the fixtures a test uses.
"""

import itertools

import pytest
from s3fs import S3FileSystem

from tests.support.s3_server import TEST_CREDENTIALS, S3Server

_bucket_numbers = itertools.count()
_FOLDER_MARKERS = {"distributed": "torchrun", "container": "container"}


def pytest_collection_modifyitems(items):
    for item in items:
        if {"s3_server", "s3_bucket"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
        folder = item.path.parent.name
        if folder in _FOLDER_MARKERS:
            item.add_marker(_FOLDER_MARKERS[folder])


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Test credentials in the environment, as the AWS chain reads them; nothing else from the machine.

    fsspec caches filesystems by their options, not by the environment: each test starts without them.
    """
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    S3FileSystem.clear_instance_cache()
    yield TEST_CREDENTIALS
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server, aws_env):
    """A new, empty bucket's URL."""
    return s3_server.create_bucket(f"bucket-{next(_bucket_numbers)}")
