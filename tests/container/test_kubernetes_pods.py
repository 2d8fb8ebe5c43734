"""The jobs that `torchx run -s kubernetes` (a Volcano Job) and `torchx run -s jobset` (a JobSet) render, run: each
one's two pods as two nodes on one podman network.

Both are rendered by the real `torchx` executable (--nnodes 2, one CPU worker per node, the training image, the
credentials Secret of k8s/ as the credentials_secret run option) and each pod template is run exactly as written,
with what the controllers add (tests/support/k8s_pods.py says what, and why `podman run`). The 2-node c10d
rendezvous forms across the network, the digits train and checkpoint to an S3 endpoint (moto) that the pods reach
at the network's gateway, with the credentials and endpoint delivered from the Secret's keys.

- Volcano: an uninterrupted run, whose backbone the JobSet's run is compared with (the two schedulers run the same
  spec, so equal backbones also show that both targets train identically). A lost Volcano node is not played
  again: its pods are the JobSet's (one builder) and Volcano's RestartJob deletes and recreates them all, as the
  JobSet's BlockingRecreate below does (the Volcano run that did it cost about 70 s of CI; the policies that decide
  it are checked in tests/unit/components/test_barlowtwins.py).
- JobSet: rendered suspended in its Kueue LocalQueue (the `queue` run option's default); the test plays Kueue's
  admission (spec.suspend false). Pod 1 finds the coordinator by the name JobSet's annotation gives it, through
  the downward API, and its JOB_COMPLETION_INDEX is 1. The coordinator's container is killed (SIGKILL, exit 137);
  what the Job's podFailurePolicy and the JobSet's failurePolicy decide for that is computed from the rendered
  policies (no rule matches: the Job fails on its backoff limit, then JobSet's default RestartJobSet, counted
  against maxRestarts) and done as the restart strategy BlockingRecreate says: the Job controller deletes the
  Job's other pod (with its grace period), every pod of the attempt is gone, and only then all are created again
  as restart attempt 1. It resumes and ends with the uninterrupted run's backbone, bit for bit.

What this cannot show, and only a cluster can: the API server (its admission and defaulting beyond what
k8s_pods models), Kueue's admission (quota, ResourceFlavors, preemption, the workload kept admitted through the
JobSet's restarts), the JobSet, Job and Volcano controllers themselves (here their decisions are computed from
the rendered policies and carried out by the test, without their timing or races), Volcano's gang scheduling,
GPUs and NCCL, pods on different machines, a cluster's DNS, PersistentVolumeClaims and IRSA.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from service.checkpoint.catalog import list_checkpoints
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.container_engine import ENGINE, IMAGE, engine
from tests.support.k8s_pods import (
    Pod,
    job_failure,
    jobset_failure_action,
    jobset_pods,
    podman_secret_name,
    volcano_pods,
)
from tests.support.runs import TINY, TINY_STEPS_PER_EPOCH, resumed_step
from tests.support.s3_server import TEST_CREDENTIALS, S3Server

ROOT = Path(__file__).resolve().parents[2]
TORCHX = str(Path(sys.executable).parent / "torchx")
SECRET = "barlow-s3-credentials"
# The tiny recipe over 2 epochs: 32 steps (global batch 64 over the 2 nodes), a checkpoint every 3 steps
TOTAL_STEPS = 2 * TINY_STEPS_PER_EPOCH
SETTINGS = [*TINY, "optim.epochs=2", "checkpoint.every_steps=3"]
GRACE_SECONDS = 30  # a pod's terminationGracePeriodSeconds when its spec does not say
USER_ERROR_EXIT = 2  # service/launch/torchrun.py: a worker stopped on the user's error


@pytest.fixture(scope="module")
def s3_for_pods():
    """moto on all interfaces: a bridge network cannot reach the host's loopback."""
    server = S3Server(host="0.0.0.0").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3_for_pods) -> str:
    return s3_for_pods.create_bucket(f"pods-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def storage(s3_for_pods) -> StorageSpec:
    return StorageSpec(endpoint_url=s3_for_pods.endpoint_url)  # the host's view of the pods' endpoint


@pytest.fixture(scope="module")
def network(image) -> Iterator[tuple[str, str]]:
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


def rendered(scheduler: str, run_url: str) -> dict:
    """What `torchx run -s SCHEDULER --dryrun` would create for the 2-node tiny run writing to `run_url`."""
    result = subprocess.run(
        [TORCHX, "run", "--workspace", "", "--dryrun", "-s", scheduler, "-cfg", f"credentials_secret={SECRET}",
         "barlowtwins.train", "--spec", "specs/digits.yaml", "--image", f"localhost/{IMAGE}", "--nnodes", "2",
         "--nproc_per_node", "1", *SETTINGS, f"run.output={run_url}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout.split("=== SCHEDULER REQUEST ===\n", 1)[1])


class Pods:
    """Pods on the network, created and deleted as their controller does."""

    def __init__(self, pods: list[Pod]):
        self.pods = pods

    def start(self) -> None:
        for pod in self.pods:
            engine("run", *pod.run_arguments)

    def delete(self, grace: int = 0) -> None:
        """Every pod deleted: SIGTERM, then SIGKILL after `grace` seconds (the kubelet's grace period)."""
        for pod in self.pods:
            engine("rm", "-f", "-t", str(grace), pod.name, check=False)

    def gone(self) -> bool:
        return all(engine("container", "exists", pod.name, check=False).returncode == 1 for pod in self.pods)

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
        return self.inspect(pod, "{{.State.Running}}", check=False) == "true"

    def inspect(self, pod: int, template: str, check: bool = True) -> str:
        return engine("inspect", "--format", template, self.pods[pod].name, check=check).stdout.strip()

    def environment(self, pod: int) -> dict[str, str]:
        """The variables the container was started with (those from Secrets apart)."""
        return dict(item.split("=", 1) for item in json.loads(self.inspect(pod, "{{json .Config.Env}}")))

    def log_tail(self, pod: int) -> str:
        log = engine("logs", self.pods[pod].name, check=False)
        return (log.stdout + log.stderr)[-3000:]


def backbone(run_url: str, storage: StorageSpec) -> dict[str, torch.Tensor]:
    fs, path = filesystem(run_url, storage)
    with fs.open(f"{path}/resnet18.pth", "rb") as file:
        return torch.load(file, weights_only=True)


def kill_after_first_checkpoint(pods: Pods, victim: int, run_url: str, storage: StorageSpec) -> list[int]:
    """SIGKILL pod `victim`'s container once the run has a valid checkpoint (exit 137); the committed steps."""
    deadline = time.monotonic() + 300  # the first comes within a minute: a rendezvous that never forms is a failure
    while not [c for c in list_checkpoints(run_url, storage) if c.valid]:
        assert time.monotonic() < deadline and pods.running(0) and pods.running(1), \
            f"no checkpoint yet: pod 0's log ends\n{pods.log_tail(0)}\npod 1's\n{pods.log_tail(1)}"
        time.sleep(0.5)
    engine("kill", pods.pods[victim].name)
    assert engine("wait", pods.pods[victim].name).stdout.strip() == "137"
    committed = [c.step for c in list_checkpoints(run_url, storage) if c.valid]
    assert committed[-1] < TOTAL_STEPS, "the node was lost too late to test a resume"
    return committed


def assert_same_backbone(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(result[key], value), key


@pytest.fixture(scope="module")
def uninterrupted(image, network, credentials_secret, bucket) -> tuple[str, str]:
    """The Volcano Job's uninterrupted 2-node run, once for the module: its run URL and its pods' logs."""
    run_url = f"{bucket}/uninterrupted"
    job = Pods(volcano_pods(rendered("kubernetes", run_url), network[0], credentials_secret,
                            max_cpus=os.cpu_count() or 1))
    try:
        job.start()
        log = "\n".join(job.wait())  # rank 0 logs, on whichever node the rendezvous made it
    finally:
        job.delete()
    return run_url, log


@pytest.fixture
def expected_backbone(uninterrupted, storage, aws_env) -> dict[str, torch.Tensor]:
    run_url, log = uninterrupted
    assert "on 2 worker(s)" in log and f"done: {TOTAL_STEPS} steps" in log, log[-3000:]
    return backbone(run_url, storage)


def test_the_rendered_volcano_job_trains_on_two_nodes(uninterrupted, expected_backbone):
    _, log = uninterrupted
    assert "on 2 worker(s)" in log and f"done: {TOTAL_STEPS} steps" in log, log[-3000:]
    assert "conv1.weight" in expected_backbone and "fc.weight" not in expected_backbone  # torchvision's keys, no fc


def test_the_rendered_jobset_trains_on_two_nodes_and_is_recreated_after_losing_its_coordinator(
        network, credentials_secret, bucket, storage, expected_backbone):
    run_url = f"{bucket}/jobset"
    jobset = rendered("jobset", run_url)
    name, spec = jobset["metadata"]["name"], jobset["spec"]
    # created suspended in its LocalQueue: a real Kueue admits it by unsuspending it, which is what is played here
    assert spec["suspend"] is True and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "barlow"
    admitted = copy.deepcopy(jobset)
    admitted["spec"]["suspend"] = False
    (replicated,) = spec["replicatedJobs"]
    coordinator = spec["coordinator"]
    coordinator_name = (f"{name}-{coordinator['replicatedJob']}-{coordinator['jobIndex']}-{coordinator['podIndex']}."
                        f"{spec['network'].get('subdomain') or name}")
    max_cpus = os.cpu_count() or 1

    attempt = Pods(jobset_pods(admitted, network[0], credentials_secret, max_cpus, restart_attempt=0))
    recreated = Pods([])
    try:
        attempt.start()
        assert attempt.pods[0].host == coordinator_name.split(".")[0]
        # pod 1, as it runs: the coordinator's name from JobSet's annotation, resolving to pod 0's address
        environment = attempt.environment(1)
        assert environment["TORCHX_RANK0_HOST"] == coordinator_name and environment["JOB_COMPLETION_INDEX"] == "1"
        labels = json.loads(attempt.inspect(1, "{{json .Config.Labels}}"))
        annotations = json.loads(attempt.inspect(1, "{{json .Config.Annotations}}"))
        assert labels["batch.kubernetes.io/job-completion-index"] == "1"
        assert labels["jobset.sigs.k8s.io/restart-attempt"] == annotations["jobset.sigs.k8s.io/restart-attempt"] == "0"
        assert annotations["jobset.sigs.k8s.io/coordinator"] == coordinator_name
        address = attempt.inspect(0, f'{{{{(index .NetworkSettings.Networks "{network[0]}").IPAddress}}}}')
        resolved = engine("exec", attempt.pods[1].name, "python", "-c",
                          "import socket, sys; print(socket.gethostbyname(sys.argv[1]))", coordinator_name)
        assert resolved.stdout.strip() == address

        committed = kill_after_first_checkpoint(attempt, 0, run_url, storage)  # the coordinator's node is lost
        # what the controllers decide, from the rendered policies: the Job fails (no podFailurePolicy rule
        # matches a SIGKILL without a DisruptionTarget condition, and backoffLimit is 0) ...
        job = replicated["template"]["spec"]
        failed = [(0, 137)] + ([] if attempt.running(1) else [(1, int(attempt.inspect(1, "{{.State.ExitCode}}")))])
        failures = [job_failure(job, attempt.pods[index], code, conditions=()) for index, code in failed]
        reason, message = next((f for f in failures if f[0] == "PodFailurePolicy"), failures[0])
        assert reason == "BackoffLimitExceeded", (failed, reason, message, attempt.log_tail(1))
        attempt.delete(grace=GRACE_SECONDS)  # ... the Job controller deletes its other pod ...
        # ... and the JobSet's failurePolicy: no rule matches, the default RestartJobSet, counted against
        # maxRestarts (1 of them), every Job of the attempt deleted and, BlockingRecreate, recreated only when all
        # their pods are gone
        policy = spec["failurePolicy"]
        assert jobset_failure_action(jobset, replicated["name"], reason, message) == "RestartJobSet"
        assert policy["maxRestarts"] >= 1 and policy["restartStrategy"] == "BlockingRecreate"
        # the same policies, for the other failures the scheduler's docstring names
        user_error = job_failure(job, attempt.pods[1], USER_ERROR_EXIT)
        disruption = job_failure(job, attempt.pods[1], 137, conditions=("DisruptionTarget",))
        assert jobset_failure_action(jobset, replicated["name"], *user_error) == "FailJobSet"
        assert jobset_failure_action(jobset, replicated["name"], *disruption) == "RestartJobSetAndIgnoreMaxRestarts"
        assert attempt.gone()

        recreated = Pods(jobset_pods(admitted, network[0], credentials_secret, max_cpus, restart_attempt=1))
        recreated.start()
        assert json.loads(recreated.inspect(1, "{{json .Config.Labels}}"))["jobset.sigs.k8s.io/restart-attempt"] == "1"
        log = "\n".join(recreated.wait())
    finally:
        attempt.delete()
        recreated.delete()

    assert committed[-1] <= resumed_step(log) < TOTAL_STEPS, log[-3000:]
    assert f"done: {TOTAL_STEPS} steps" in log and "on 2 worker(s)" in log
    assert_same_backbone(backbone(run_url, storage), expected_backbone)
