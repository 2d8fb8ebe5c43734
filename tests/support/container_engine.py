"""The container engine (Docker, or podman where no daemon runs) and the training image the container tests use."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
ENGINE = str(ROOT / "docker" / "engine.sh")
IMAGE = "barlowtwins-service:test"
LOCAL_BASE = "localhost/debian-python:3.11-bookworm"


def engine(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def base_image() -> str | None:
    """BARLOW_BASE_IMAGE, else a locally made Debian base where debootstrap can run (no registry here), else None:
    the Dockerfile's default base, pulled from a registry."""
    if os.environ.get("BARLOW_BASE_IMAGE"):
        return os.environ["BARLOW_BASE_IMAGE"]
    if shutil.which("debootstrap") and os.geteuid() == 0:
        subprocess.run([str(ROOT / "docker" / "base-image.sh"), LOCAL_BASE], check=True, timeout=900,
                       capture_output=True)
        return LOCAL_BASE
    return None


def build_image() -> str:
    """Build the training image from docker/Dockerfile (skipped without a working engine); one build at a time on
    this machine, so that pytest-xdist's workers share the first one's layers instead of building them twice."""
    with FileLock(Path(tempfile.gettempdir()) / "barlowtwins-image-build.lock"):
        return _build_image()


def _build_image() -> str:
    name = subprocess.run([ENGINE, "name"], capture_output=True, text=True)
    if name.returncode != 0:
        pytest.skip(f"NO CONTAINER ENGINE: the training image was neither built nor run. {name.stderr.strip()}")
    if engine("info", check=False).returncode != 0:
        pytest.skip(f"NO WORKING CONTAINER ENGINE: `{name.stdout.strip()} info` fails; the image was not tested")
    base = base_image()
    env = {**os.environ, **({"BASE_IMAGE": base} if base else {})}
    build = subprocess.run([str(ROOT / "docker" / "build.sh"), IMAGE], env=env, capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, f"the image did not build:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return IMAGE




class BackgroundBuild:
    """The image built in a daemon thread, started once the session knows it has container tests: they run last,
    and the build (minutes of wheels unpacked into layers, mostly disk) overlaps the tests that run before them."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: tuple[str | None, BaseException | None] = (None, None)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._build, name="image-build", daemon=True)
            self._thread.start()

    def _build(self) -> None:
        try:
            self._outcome = (build_image(), None)
        except BaseException as error:  # noqa: BLE001 - pytest.skip's and the assertion's, handed to the fixture
            self._outcome = (None, error)
        self._done.set()

    def result(self) -> str:
        self.start()
        self._done.wait()
        image, error = self._outcome
        if error is not None:
            raise error
        assert image is not None
        return image


background_build = BackgroundBuild()
