import itertools

import pytest
from s3fs import S3FileSystem

from tests.s3_server import TEST_CREDENTIALS, S3Server

_bucket_numbers = itertools.count()


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
