"""Exact resume of real torchrun runs from S3: killed workers, SIGTERM, world-size-independent progress.

The interrupted runs must end with the same parameters, bit for bit, as an uninterrupted run with the same seed:
on the CPU every operation here is deterministic, the data order and the augmentations are functions of
(seed, epoch, index), and the checkpoint holds the model, the LARS momentum and the position inside the epoch.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.spec import StorageSpec
from service.storage.checkpoint import list_checkpoints
from tests.support.runs import resumed_step

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["optim.epochs=2", "checkpoint.every_steps=3", "run.log_every=1"]


def command(run_url: str, endpoint: str, nproc: int) -> list[str]:
    overrides = [arg for setting in [*SETTINGS, f"run.output={run_url}", f"storage.endpoint_url={endpoint}"]
                 for arg in ("--set", setting)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "service", "train", "specs/digits.yaml", *overrides]


def start(run_url, endpoint, nproc=2) -> subprocess.Popen:
    return subprocess.Popen(command(run_url, endpoint, nproc), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout=600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def wait_for_mid_epoch_checkpoint(run_url: str, storage: StorageSpec, process: subprocess.Popen) -> int:
    """Block until a committed checkpoint lies inside an epoch; returns its step."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        inside = [c.step for c in list_checkpoints(run_url, storage) if c.valid and c.manifest["batch_in_epoch"]]
        if inside:
            return inside[-1]
        time.sleep(0.2)
    raise AssertionError("no mid-epoch checkpoint appeared")


def read_outputs(fs, run: str) -> tuple[dict, dict[int, float]]:
    with fs.open(f"{run}/resnet18.pth", "rb") as file:
        backbone = torch.load(file, weights_only=True)
    losses = {}
    for line in fs.cat_file(f"{run}/stats.txt").decode().splitlines():
        if line.startswith("{") and '"loss"' in line:  # training lines, not the kNN monitor's
            entry = json.loads(line)
            losses[entry["step"]] = entry["loss"]
    return backbone, losses


@pytest.fixture(scope="module")
def uninterrupted(s3_server, tmp_path_factory):
    from tests.support.s3_server import TEST_CREDENTIALS

    os.environ.update(TEST_CREDENTIALS)
    bucket = s3_server.create_bucket("uninterrupted")
    finish(start(f"{bucket}/run", s3_server.endpoint_url))
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    from service.storage.filesystem import filesystem

    fs, path = filesystem(f"{bucket}/run", storage)
    return read_outputs(fs, path)


def assert_same_run(outputs, reference) -> None:
    backbone, losses = outputs
    expected_backbone, expected_losses = reference
    assert sorted(losses) == list(range(16))
    assert losses == expected_losses  # every logged loss, before and after the interruption
    for key, value in expected_backbone.items():
        assert torch.equal(backbone[key], value), key


def test_worker_killed_mid_epoch_resumes_exactly(uninterrupted, s3_bucket, s3_server):
    from service.storage.filesystem import filesystem

    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    run = f"{s3_bucket}/run"
    process = start(run, s3_server.endpoint_url)
    step = wait_for_mid_epoch_checkpoint(run, storage, process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, "the job should fail when a worker is killed (no restarts asked for)"

    resumed = finish(start(run, s3_server.endpoint_url))
    resumed_at = resumed_step(resumed)
    assert resumed_at >= step
    fs, path = filesystem(run, storage)
    assert_same_run(read_outputs(fs, path), uninterrupted)


def test_sigterm_checkpoints_stops_and_resumes_exactly(uninterrupted, s3_bucket, s3_server):
    from service.storage.filesystem import filesystem

    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    run = f"{s3_bucket}/run"
    process = start(run, s3_server.endpoint_url)
    wait_for_mid_epoch_checkpoint(run, storage, process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for worker in workers:  # as torchrun forwards Kubernetes' SIGTERM to every worker
        os.kill(int(worker), signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "stopped by SIGTERM after" in output, output[-3000:]
    stopped_at = int(output.split("stopped by SIGTERM after ")[1].split()[0])
    assert stopped_at in [c.step for c in list_checkpoints(run, storage) if c.valid]

    resumed = finish(start(run, s3_server.endpoint_url))
    assert resumed_step(resumed) == stopped_at
    fs, path = filesystem(run, storage)
    assert_same_run(read_outputs(fs, path), uninterrupted)
