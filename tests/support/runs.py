"""Running `barlow` as a user types it, the one tiny-run recipe, and reading back what a run wrote.

Runs are deterministic, so a resume from too early a step (or none) trains the same steps again and ends with the
same outputs: comparing outputs cannot tell, and any progress line contains "step N". Only the resumed step can
(`resumed_step`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from service.runtime.machine import usable_cpus
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.s3_server import TEST_CREDENTIALS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BARLOW = str(BIN / "barlow")
DIGITS = "specs/digits.yaml"

# The one tiny-run recipe: the digits demo shrunk to seconds (8 px crops, batch 64: 16 steps an epoch, a 64-64
# projector, every step logged, a checkpoint every 4 steps, no kNN monitor). A test that needs another shape adds
# its own overrides after these and says why.
TINY = ["data.image_size=8", "optim.batch_size=64", "optim.epochs=1", "model.projector=64-64",
        "monitor.knn_every_epochs=null", "checkpoint.every_steps=4", "run.log_every=1"]
TINY_STEPS_PER_EPOCH = 1078 // 64  # scikit-learn's digits less the held-out 40 %, in whole batches

_RESUMED = re.compile(r"resumed from \S+: step (\d+)")


def overrides(*settings: str) -> list[str]:
    """`--set` arguments for each setting."""
    return [arg for setting in settings for arg in ("--set", setting)]


def train_args(output: str, *extra: str, endpoint: str | None = None, recipe: list[str] = TINY) -> list[str]:
    """`barlow train` arguments of the tiny recipe writing to `output` (on `endpoint`'s S3 when given)."""
    settings = [*recipe, f"run.output={output}", *([f"storage.endpoint_url={endpoint}"] if endpoint else []), *extra]
    return ["train", DIGITS, *overrides(*settings)]


def command(*args: str, torchrun: int | None = None) -> list[str]:
    """`barlow ARGS`, or `python -m service ARGS` on `torchrun` workers (torchrun --standalone)."""
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                "-m", "service", *args]
    return [BARLOW, *args]


def cores_per_worker() -> int:
    """The cores one pytest-xdist worker may keep busy (all of them without xdist). Two workers each running a
    2-thread step on 2 cores spin at each other's OpenMP barriers: the demo's pretraining took 3.3 times as long."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, int(usable_cpus()) // workers)


def environment(threads: int = 1, env: dict[str, str] | None = None) -> dict[str, str]:
    threads = min(threads, cores_per_worker())
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(env or {})}


def run_barlow(*args: str, torchrun: int | None = None, threads: int = 1, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `barlow ARGS` (or under torchrun) to its end from the repository root; a run past `timeout` fails."""
    return subprocess.run(command(*args, torchrun=torchrun), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment(threads, env))


def start_barlow(*args: str, torchrun: int | None = None, threads: int = 1,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `barlow ARGS` (or under torchrun) in its own session, output and errors on one pipe."""
    return subprocess.Popen(command(*args, torchrun=torchrun), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment(threads, env),
                            start_new_session=True)


def stats_records(text: str) -> list[dict]:
    """stats.txt's JSON lines (the command lines that head each attempt left out)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def logged_steps(records: list[dict]) -> list[dict]:
    """The lines of trained steps (not events, not the kNN monitor's, not a resume's marker)."""
    return [record for record in records if "loss" in record and "event" not in record]


def events(records: list[dict]) -> list[dict]:
    return [record for record in records if "event" in record]


def resumed_step(log: str) -> int:
    """N of the run's `resumed from URL: step N (...)` line (the checkpoint manager logs it); fails if there is none."""
    match = _RESUMED.search(log)
    assert match, f"the run did not resume:\n{log[-3000:]}"
    return int(match.group(1))


# --- the runs that tests/e2e/conftest.py shares (one of each per test session) ---

# The shared torchrun runs (`tiny_run`, `resumed_run`) and their interrupted twins: the tiny recipe with every
# observation on (the kNN monitor after the epoch, a cross-correlation image every 2 steps) and the colour
# augmentations on the device, whose views are the same at any world size.
SHARED = [*TINY, "monitor.knn_every_epochs=1", "run.image_every=2", "augment.color_on=device"]
# The local reference (`local_run`) keeps its checkpoints 8, 12 and 16: a test can corrupt the two newest and still
# resume from the third. Its reruns pass the same settings.
LOCAL = ["checkpoint.keep_last=3"]
IN_A_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}  # as a pod's environment has it
# What a `barlow` subprocess needs for the moto S3 server: its credentials, and nothing from this machine's ~/.aws.
S3_ENV = {**TEST_CREDENTIALS, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


@dataclass(frozen=True)
class Run:
    """A finished run: where it is, and what its (last) `barlow train` printed."""

    url: str
    storage: StorageSpec
    result: subprocess.CompletedProcess | None = None

    @property
    def endpoint(self) -> str | None:
        return self.storage.endpoint_url

    def read(self, name: str) -> bytes:
        """The run's file `name` (e.g. stats.txt); on S3, with the test's credentials (the aws_env fixture)."""
        fs, path = filesystem(f"{self.url}/{name}", self.storage)
        return fs.cat_file(path)

    def records(self) -> list[dict]:
        return stats_records(self.read("stats.txt").decode())


def copy_tree(fs, source: str, destination: str, skip: tuple[str, ...] = ()) -> None:
    """Copy the files under `source` to `destination` on `fs` (server-side on S3), but those whose path relative to
    `source` starts with one of `skip`."""
    for path in fs.find(source):
        relative = path[len(source.rstrip("/")) + 1:]
        if not relative.startswith(skip):
            fs.copy(path, f"{destination.rstrip('/')}/{relative}")


def step_losses(records: list[dict]) -> dict[int, list[float]]:
    """Each trained step's logged losses, in the order logged (a step trained again after a restart has several)."""
    losses: dict[int, list[float]] = {}
    for record in logged_steps(records):
        losses.setdefault(record["step"], []).append(record["loss"])
    return losses
