import pytest

from tests.support.container_engine import build_image


@pytest.fixture(scope="session")
def image() -> str:
    """The training image, built once per test session from docker/Dockerfile (skipped without an engine)."""
    return build_image()
