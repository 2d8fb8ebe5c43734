"""checkov's security checks on what goes to the cluster: the objects each overlay of k8s/ builds (`kubectl
kustomize`) and k8s/optional/, the pods of the Volcano Job that `torchx run` renders, and a privileged pod it must
report. One checkov run scans them all (its start-up is most of its time); each test reads the failures of its own
objects. The first run creates checkov's own virtual environment (about 40 s)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.commands import torchx_job
from tests.support.k8s_checks import checkov_failures_by_group, volcano_job
from tests.support.k8s_schemas import template_as_pod
from tests.support.runs import ROOT

K8S = ROOT / "k8s"
OVERLAYS = ("volcano", "kueue")
NAMESPACE = "barlow"
# checkov check id -> why it does not apply to the manifests under k8s/; every entry must still fail without it.
CHECKOV_SKIPS: dict[str, str] = {}
# checkov's findings that do not apply to the pods of a batch training job, each with the reason
POD_CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probe: a training worker is a batch process; torchrun's agent watches its workers",
    "CKV_K8S_9": "readiness probe: the pods serve no traffic",
    "CKV_K8S_43": "image digest: the image is a parameter of the job; pin a digest with --image REPO@sha256:...",
    "CKV_K8S_14": "image tag: the default tag is a placeholder, the job's image is a parameter",
    "CKV_K8S_40": "high UID: the training image's user is 1000, as the Dockerfile sets it",
    "CKV_K8S_35": "secrets as files: the AWS credential chain reads these variables; IRSA needs no secret at all",
}


def _kubectl() -> str | None:
    """kubectl beside this Python (a wheel in the virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def manifests() -> dict[str, list[dict]]:
    """What `kubectl kustomize` builds of each overlay (both hold the base: checkov scans its objects twice, once
    beside each scheduler's queue), and the files of k8s/optional/; without kubectl, the optional files only."""
    groups = {}
    kubectl = _kubectl()
    for overlay in OVERLAYS if kubectl else ():
        build = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                               text=True, check=True, timeout=60)
        groups[f"{overlay} overlay"] = [document for document in yaml.safe_load_all(build.stdout) if document]
    groups["optional"] = [document for path in sorted((K8S / "optional").glob("*.yaml"))
                          for document in yaml.safe_load_all(path.read_text()) if document is not None]
    return groups


def torchx_pods() -> list[dict]:
    """The pods of the job `torchx run` renders for ImageNet on 2 to 4 H100 nodes, with the training network
    policy they run under."""
    job = torchx_job("-cfg", "credentials_secret=barlow-s3-credentials", "barlowtwins.train", "--spec",
                     "specs/imagenet-1000ep.yaml", "--nnodes", "2:4", "--h", "gpu_8xh100", "run.output=s3://b/r")
    pods = []
    for task in job["spec"]["tasks"]:
        pod = template_as_pod(task["template"])
        pod["metadata"]["namespace"] = NAMESPACE
        pods.append(pod)
    policy = yaml.safe_load((K8S / "base" / "networkpolicy-training.yaml").read_text())
    return [*pods, policy]


def privileged_pod() -> dict:
    pod = template_as_pod(volcano_job()["spec"]["tasks"][0]["template"])
    pod["metadata"]["namespace"] = NAMESPACE
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    return pod


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, list[str]]:
    """Each group's failing checks, the skips not yet taken off (the tests check them)."""
    return checkov_failures_by_group({
        **manifests(), "torchx pods": torchx_pods(), "privileged pod": [privileged_pod()],
        "privileged pod, skipped": [privileged_pod()],
    }, skips={"privileged pod, skipped": {"CKV_K8S_16": "example of a justified skip"}})


@pytest.mark.slow
@pytest.mark.parametrize("group", [*(f"{overlay} overlay" for overlay in OVERLAYS), "optional"])
def test_manifests_pass_checkov(checkov_report, group):
    if group not in checkov_report:
        pytest.skip("kubectl is not installed: the overlays cannot be built with `kubectl kustomize`")
    assert sorted(set(checkov_report[group]) - set(CHECKOV_SKIPS)) == []


@pytest.mark.slow
def test_every_checkov_skip_is_justified_and_still_needed(checkov_report):
    assert all(why.strip() for why in CHECKOV_SKIPS.values()), "every skipped check needs a justification"
    failures = set().union(*(checkov_report.get(f"{overlay} overlay", []) for overlay in OVERLAYS),
                           checkov_report["optional"])
    assert set(CHECKOV_SKIPS) <= failures, "a skipped check passes now: drop it from CHECKOV_SKIPS"


@pytest.mark.slow
def test_checkov_reports_a_privileged_pod_unless_skipped(checkov_report):
    assert "CKV_K8S_16" in checkov_report["privileged pod"]
    assert "CKV_K8S_16" not in checkov_report["privileged pod, skipped"]


@pytest.mark.slow
def test_the_pods_torchx_run_renders_pass_checkov(checkov_report):
    assert all(why.strip() for why in POD_CHECKOV_SKIPS.values())
    assert sorted(set(checkov_report["torchx pods"]) - set(POD_CHECKOV_SKIPS)) == []
