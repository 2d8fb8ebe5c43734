import pytest

from tests.support.container_engine import background_build


@pytest.fixture(scope="session")
def image() -> str:
    """The training image, built once per test session from docker/Dockerfile (skipped without an engine); the build
    started in the background when the session's tests were collected (tests/conftest.py)."""
    return background_build.result()
