"""The Volcano Job that `torchx run -s kubernetes` renders, run: its two pods as two nodes on one podman network.

The job is rendered by the real `torchx` executable (--nnodes 2, one CPU worker per node, the training image,
the credentials Secret of k8s/ as the credentials_secret run option) and each pod template is run exactly as
written, with what Volcano adds (tests/container/volcano_pods.py says how, and why `podman run`). The 2-node c10d
rendezvous forms across the network, the digits train and checkpoint to an S3 endpoint (moto) that the pods reach
at the network's gateway, with the credentials and endpoint delivered from the Secret's keys. One node's
container is killed mid-run; as the job's RestartJob policy has Volcano do, the job's pods are recreated; it
resumes from its last S3 checkpoint and ends with a backbone bit-identical to an uninterrupted 2-node run's.

What this cannot show, and only a cluster can: Volcano's gang scheduling and its restart of the job, GPUs and
NCCL, pods on different machines, PersistentVolumeClaims, IRSA, and the API server's own admission checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from service.checkpoint.catalog import list_checkpoints
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.container_engine import ENGINE, IMAGE, engine
from tests.support.runs import TINY, TINY_STEPS_PER_EPOCH, resumed_step
from tests.support.s3_server import TEST_CREDENTIALS, S3Server
from tests.support.volcano_pods import podman_secret_name, pods

ROOT = Path(__file__).resolve().parents[2]
TORCHX = str(Path(sys.executable).parent / "torchx")
SECRET = "barlow-s3-credentials"
# The tiny recipe over 2 epochs: 32 steps (global batch 64 over the 2 nodes), a checkpoint every 3 steps
TOTAL_STEPS = 2 * TINY_STEPS_PER_EPOCH
SETTINGS = [*TINY, "optim.epochs=2", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def s3_for_pods():
    """moto on all interfaces: a bridge network cannot reach the host's loopback."""
    server = S3Server(host="0.0.0.0").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def network(image) -> tuple[str, str]:
    """A podman bridge network and its gateway, the host's address on it."""
    name = f"barlow-test-{uuid.uuid4().hex[:6]}"
    engine("network", "create", name)
    gateway = engine("network", "inspect", name, "--format", "{{range .Subnets}}{{.Gateway}}{{end}}").stdout.strip()
    yield name, gateway
    engine("network", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def credentials_secret(image, s3_for_pods, network):
    """k8s/'s Secret with test values: each of its keys becomes a podman secret the pods get as a variable."""
    manifest = yaml.safe_load((ROOT / "k8s" / "optional" / "secret-s3-credentials.yaml").read_text())
    assert manifest["metadata"]["name"] == SECRET
    values = {"AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
              "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
              # an address, not host.containers.internal: moto reads a Host name's first label as a bucket
              "AWS_ENDPOINT_URL": f"http://{network[1]}:{s3_for_pods.port}",
              "AWS_DEFAULT_REGION": TEST_CREDENTIALS["AWS_DEFAULT_REGION"]}
    assert set(manifest["stringData"]) == set(values)
    for key, value in values.items():
        subprocess.run([ENGINE, "secret", "rm", podman_secret_name(SECRET, key)], capture_output=True)
        subprocess.run([ENGINE, "secret", "create", podman_secret_name(SECRET, key), "-"], input=value, text=True,
                       check=True, capture_output=True)
    yield {SECRET: values}
    for key in values:
        subprocess.run([ENGINE, "secret", "rm", podman_secret_name(SECRET, key)], capture_output=True)


def rendered_job(run_url: str) -> dict:
    result = subprocess.run(
        [TORCHX, "run", "--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", f"credentials_secret={SECRET}",
         "barlowtwins.train", "--spec", "specs/digits.yaml", "--image", f"localhost/{IMAGE}", "--nnodes", "2",
         "--nproc_per_node", "1", *SETTINGS, f"run.output={run_url}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout.split("=== SCHEDULER REQUEST ===\n", 1)[1])


class Job:
    """The job's pods on the network; `restart` is Volcano's RestartJob: every pod deleted and created again."""

    def __init__(self, job: dict, network: str, secrets: dict):
        self.pods = pods(job, network, secrets, max_cpus=os.cpu_count() or 1)

    def start(self) -> None:
        for pod in self.pods:
            engine("run", *pod.run_arguments)

    def delete(self) -> None:
        for pod in self.pods:
            engine("rm", "-f", "-t", "0", pod.name, check=False)

    def restart(self) -> None:
        self.delete()
        self.start()

    def wait(self, timeout: float = 900) -> list[str]:
        """Every pod's exit code must be 0; their logs."""
        logs = []
        for pod in self.pods:
            code = engine("wait", pod.name, timeout=timeout).stdout.strip()
            log = engine("logs", pod.name)
            logs.append(log.stdout + log.stderr)
            assert code == "0", f"{pod.name} exited {code}:\n{logs[-1][-5000:]}"
        return logs

    def running(self, pod: int) -> bool:
        state = engine("inspect", "--format", "{{.State.Running}}", self.pods[pod].name, check=False)
        return state.stdout.strip() == "true"


def backbone(run_url: str, storage: StorageSpec) -> dict[str, torch.Tensor]:
    fs, path = filesystem(run_url, storage)
    with fs.open(f"{path}/resnet18.pth", "rb") as file:
        return torch.load(file, weights_only=True)


def test_the_rendered_job_trains_on_two_nodes_and_resumes_after_losing_one(
        image, network, credentials_secret, s3_for_pods, aws_env):
    bucket = s3_for_pods.create_bucket(f"pods-{uuid.uuid4().hex[:6]}")
    storage = StorageSpec(endpoint_url=s3_for_pods.endpoint_url)  # the host's view of the same endpoint

    uninterrupted = Job(rendered_job(f"{bucket}/uninterrupted"), network[0], credentials_secret)
    interrupted = Job(rendered_job(f"{bucket}/interrupted"), network[0], credentials_secret)
    try:
        uninterrupted.start()
        log = "\n".join(uninterrupted.wait())  # rank 0 logs, on whichever node the rendezvous made it
        assert "on 2 worker(s)" in log and f"done: {TOTAL_STEPS} steps" in log, log[-3000:]
        expected = backbone(f"{bucket}/uninterrupted", storage)
        uninterrupted.delete()

        interrupted.start()
        deadline = time.monotonic() + 600
        while not [c for c in list_checkpoints(f"{bucket}/interrupted", storage) if c.valid]:
            assert time.monotonic() < deadline and interrupted.running(0) and interrupted.running(1), \
                engine("logs", interrupted.pods[0].name).stderr[-3000:]
            time.sleep(0.5)
        engine("kill", interrupted.pods[1].name)  # the second node is lost
        assert engine("wait", interrupted.pods[1].name).stdout.strip() == "137"
        committed = [c.step for c in list_checkpoints(f"{bucket}/interrupted", storage) if c.valid]
        assert committed[-1] < TOTAL_STEPS, "the node was lost too late to test a resume"
        interrupted.restart()
        log = "\n".join(interrupted.wait())
    finally:
        uninterrupted.delete()
        interrupted.delete()

    assert committed[-1] <= resumed_step(log) < TOTAL_STEPS, log[-3000:]
    assert f"done: {TOTAL_STEPS} steps" in log and "on 2 worker(s)" in log
    result = backbone(f"{bucket}/interrupted", storage)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(result[key], value), key
