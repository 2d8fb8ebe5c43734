"""Exact resume of a real 2-worker job, launched as a laptop user would (`torchx run -s local_cwd`), after a killed
worker and after Kubernetes' SIGTERM (a pre-emption).

Both interruptions hit one job (the `interrupted` fixture, its own run: the one interrupted): a worker is killed
after a mid-epoch checkpoint, so torchrun restarts the worker group (--max_restarts) and it resumes from that
checkpoint; after a later checkpoint every worker gets SIGTERM, so the job checkpoints and stops; the same command
finishes it. It must end with the same parameters, bit for bit, as the uninterrupted shared tiny run with the same
settings (tests/e2e/conftest.py): on the CPU every operation here is deterministic, the data order and the
augmentations are functions of (seed, epoch, index) (the colour's of the step and the global row), and the
checkpoint holds the model, the LARS momentum and the position inside the epoch.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision

from service.checkpoint.catalog import list_checkpoints
from service.checkpoint.export import read_weights
from service.spec import StorageSpec
from tests.support.runs import BIN, DIGITS, ROOT, SHARED, environment, resumed_step, stats_records, step_losses

ON_PATH = {"PATH": f"{BIN}:{os.environ['PATH']}"}  # torchx's local_cwd scheduler starts `torchrun` from the PATH


def torchx_run(output: Path, nproc: int = 2, max_restarts: int = 3) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "torchx"), "run", "--wait", "--log", "-s", "local_cwd", "components/barlowtwins.py:train",
         "--spec", DIGITS, "--nproc_per_node", str(nproc), "--max_restarts", str(max_restarts),
         *SHARED, f"run.output={output}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(env=ON_PATH))


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0 and "SUCCEEDED" in output, output[-4000:]
    return output


def workers_of(output: Path) -> list[int]:
    """PIDs of the training workers (not the torchrun agent, nor their data-loading processes) of the run writing to
    `output`: the job carries its spec in the environment (BARLOW_SPEC), torchrun gives each worker a LOCAL_RANK,
    and a loading process, which inherits both, is a worker's child."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        variables = dict(item.partition(b"=")[::2] for item in environ if item)
        if b"LOCAL_RANK" in variables and f"output: {output}\n".encode() in variables.get(b"BARLOW_SPEC", b""):
            parents[int(entry.name)] = int(status.split("PPid:")[1].split()[0])
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


def mid_epoch_checkpoint_after(step: int, output: Path, process: subprocess.Popen) -> int:
    """Block until a committed checkpoint later than `step` lies inside an epoch; returns its step."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        inside = [c.step for c in list_checkpoints(str(output), StorageSpec())
                  if c.valid and c.manifest["batch_in_epoch"] and c.step > step]
        if inside:
            return inside[-1]
        time.sleep(0.2)
    raise AssertionError(f"no mid-epoch checkpoint after step {step}:\n{process.communicate()[0][-3000:]}")


@dataclass(frozen=True)
class Interrupted:
    output: Path
    killed_after: int  # the checkpoint committed when a worker was killed
    job: str  # the first job's log: the kill, the restart, the SIGTERM
    stopped_at: int
    valid_when_stopped: list[int]
    rerun: str  # the log of the same command, run again


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Interrupted:
    output = tmp_path_factory.mktemp("interrupted") / "run"
    job = torchx_run(output)
    killed_after = mid_epoch_checkpoint_after(-1, output, job)
    os.kill(workers_of(output)[-1], signal.SIGKILL)
    mid_epoch_checkpoint_after(killed_after, output, job)  # the restarted group's
    for worker in workers_of(output):  # as torchrun forwards Kubernetes' SIGTERM to every worker
        os.kill(worker, signal.SIGTERM)
    log = finish(job)
    assert "stopped by SIGTERM after" in log, log[-3000:]
    stopped_at = int(log.split("stopped by SIGTERM after ")[1].split()[0])
    valid = [c.step for c in list_checkpoints(str(output), StorageSpec()) if c.valid]
    return Interrupted(output, killed_after, log, stopped_at, valid, finish(torchx_run(output)))


def assert_same_as_uninterrupted(output: Path, reference) -> None:
    backbone = torch.load(output / "resnet18.pth", weights_only=True)
    assert backbone.keys() == torchvision.models.resnet18().state_dict().keys() - {"fc.weight", "fc.bias"}
    for key, value in read_weights(f"{reference.url}/resnet18.pth", reference.storage).items():
        assert torch.equal(backbone[key], value), key


def test_killed_worker_restarts_the_group_and_resumes_exactly(interrupted, tiny_run, aws_env):
    resumed = resumed_step(interrupted.job)  # the restarted group's
    assert interrupted.killed_after <= resumed < 16, interrupted.job[-3000:]
    losses = step_losses(stats_records((interrupted.output / "stats.txt").read_text()))
    expected = {step: values[0] for step, values in step_losses(tiny_run.records()).items()}
    assert sorted(losses) == list(range(16))
    # a real resume trains the steps before its checkpoint once (a restart from step 0 would train them twice)
    assert all(len(losses[step]) == 1 for step in range(resumed))
    # steps after the checkpoint were trained twice (before the failure and after the restart), identically
    assert all(values == [expected[step]] * len(values) for step, values in losses.items())
    assert_same_as_uninterrupted(interrupted.output, tiny_run)


def test_sigterm_checkpoints_stops_and_resumes_exactly(interrupted, tiny_run, aws_env):
    assert resumed_step(interrupted.job) < interrupted.stopped_at < 16  # after the restart, before the end
    assert interrupted.stopped_at in interrupted.valid_when_stopped
    assert resumed_step(interrupted.rerun) == interrupted.stopped_at
    losses = step_losses(stats_records((interrupted.output / "stats.txt").read_text()))
    assert all(len(losses[step]) == 1 for step in range(interrupted.stopped_at, 16))  # nothing trained again
    assert_same_as_uninterrupted(interrupted.output, tiny_run)
