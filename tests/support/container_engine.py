"""The container engine (Docker, or podman where no daemon runs) and the training image the container tests use."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


