"""checkov's security checks on what goes to the cluster: the objects each overlay of k8s/ builds (`kubectl
kustomize`) and k8s/optional/, the pods of the Volcano Job that `torchx run` renders, and a privileged pod it must
report. One checkov run scans them all (its start-up is most of its time); each test reads the failures of its own
objects. The first run creates checkov's own virtual environment (about 40 s)."""

import pytest
import yaml

from tests.support.commands import torchx_job
from tests.support.k8s_checks import (
    FOLDERS,
    checkov_failures_by_group,
    kustomize_build,
    read_kustomization,
    volcano_job,
)
from tests.support.k8s_schemas import template_as_pod, validate_manifest
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


def manifests() -> dict[str, list[dict]]:
    """What `kubectl kustomize` builds of each overlay (both hold the base: checkov scans its objects twice, once
    beside each scheduler's queue), and the files of k8s/optional/."""
    groups = {f"{overlay} overlay": kustomize_build(FOLDERS[overlay]) for overlay in OVERLAYS}
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


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    """What `kubectl kustomize` builds of each folder (one call each, about 0.1 s; it needs no cluster)."""
    return {name: kustomize_build(folder) for name, folder in FOLDERS.items()}


@pytest.mark.parametrize("name", FOLDERS)
def test_kubectl_kustomize_builds_each_folder_as_the_manifest_tests_read_it(built, name):
    """tests/unit/test_k8s_manifests.py reads the kustomizations in process (read_kustomization): kubectl must agree."""
    def key(obj: dict) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(built[name], key=key) == sorted(read_kustomization(FOLDERS[name]), key=key)


@pytest.mark.parametrize("name", FOLDERS)
def test_every_built_object_validates(built, name):
    for obj in built[name]:
        validate_manifest(obj)
