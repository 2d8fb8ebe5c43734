"""The demo's pretraining run in the background of a test session (tests/conftest.py starts it, test_demo.py waits)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from service.spec import StorageSpec
from tests.support.runs import DIGITS, ROOT, command, environment, overrides
from tests.support.s3_server import TEST_CREDENTIALS

DEMO_TESTS = "tests/e2e/test_demo.py"
TIMEOUT_S = 1800  # 6 min alone on 2 cores; 14 min seen beside other tests on them


@dataclass
class BackgroundRun:
    """`barlow train specs/digits.yaml` unchanged (30 epochs, 240 steps, the kNN monitor every 10 epochs) on one
    torchrun worker with two threads, as `make demo` runs it on a 2-core machine, writing to `url` on S3."""

    url: str
    storage: StorageSpec
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, url: str, endpoint: str, log: Path) -> BackgroundRun:
        args = ["train", DIGITS, *overrides(f"run.output={url}", f"storage.endpoint_url={endpoint}")]
        with open(log, "wb") as output:  # a file, not a pipe: nobody reads it until the end
            process = subprocess.Popen(command(*args, torchrun=1), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                       env=environment(2, TEST_CREDENTIALS), start_new_session=True)
        return cls(url, StorageSpec(endpoint_url=endpoint), process, log)

    def finished(self) -> tuple[str, StorageSpec]:
        """Wait for the run's end; (its URL, its storage) when it succeeded, an AssertionError with its log's tail
        otherwise."""
        try:
            code = self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the demo's pretraining ran past {TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")
        assert code == 0, f"the demo's pretraining exited {code}:\n{self.log.read_text()[-3000:]}"
        return self.url, self.storage

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
