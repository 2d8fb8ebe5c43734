"""Fixtures every kind of test may use: the moto S3 server (one per test session), its credentials, new buckets.

Where a test lives says what it needs (`tests/unit`: one module, in process; `tests/integration`: a module with its
real neighbours, the S3 server or loader processes; `tests/e2e`: what a user types, in subprocesses;
`tests/distributed`: torchrun workers; `tests/container`: the image under podman). The markers say it too, so that
`-m "not container"` and the like select across folders; the S3 marker is set here from the fixtures a test uses.
"""

import itertools
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from tests.support.container_engine import background_build
from tests.support.s3_server import TEST_CREDENTIALS, S3Server

_TESTS = Path(__file__).resolve().parent
_bucket_numbers = itertools.count()
# a folder's tests all need what its markers say; `slow` marks every test that starts a Python process (with torch)
_FOLDER_MARKERS = {"e2e": ("slow",), "distributed": ("slow", "torchrun"), "container": ("slow", "container")}
# the order the folders run in: the quick ones first, so that a broken module fails in seconds; the container tests
# last, so that the image builds in the background meanwhile
_FOLDER_ORDER = ["unit", "integration", "e2e", "distributed", "container"]


def _folder(item: pytest.Item) -> str:
    return item.path.relative_to(_TESTS).parts[0] if item.path.is_relative_to(_TESTS) else ""


def pytest_collection_modifyitems(items):
    for item in items:
        if {"s3_server", "s3_bucket"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
        for marker in _FOLDER_MARKERS.get(_folder(item), ()):
            item.add_marker(marker)
    rank = {folder: index for index, folder in enumerate(_FOLDER_ORDER)}
    items.sort(key=lambda item: rank.get(_folder(item), len(rank)))


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(item.get_closest_marker("container") for item in session.items):
        background_build.start()


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
