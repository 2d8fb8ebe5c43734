"""Launch, watch and stop training jobs through the TorchX Runner.

`submit` builds the `components/barlowtwins.py:train` AppDef and, on Kubernetes, completes the Volcano Job that
torchx 0.7.0's scheduler renders with what it cannot express: memory in MiB for both request and limit (it writes
decimal megabytes and requests 1 GiB less, 0M for small jobs), a /dev/shm size limit, tolerations, node
selectors, image pull secrets, a non-root and read-only security context, and the storage credentials from a
Secret (or IRSA through the service account). Plain `torchx run` still works, with what it can express.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

from components.barlowtwins import parse_nnodes
from components.resources import SHM_CAPABILITY

RUN_AS_USER = 1000  # the training image's non-root user


@dataclass
class KubernetesOptions:
    queue: str = "barlow"
    namespace: str = "barlow"
    service_account: str | None = "barlow-trainer"
    priority_class: str | None = None
    tolerations: list[str] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    image_pull_secrets: list[str] = field(default_factory=list)
    s3_secret: str | None = None


def parse_toleration(text: str) -> dict[str, str]:
    """`key[=value]:Effect` (Effect: NoSchedule, PreferNoSchedule or NoExecute) to a toleration."""
    key_value, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not key_value:
        raise ValueError(f"toleration {text!r} must be key[=value]:Effect, e.g. nvidia.com/gpu:NoSchedule")
    key, has_value, value = key_value.partition("=")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def complete_volcano_job(job: dict, *, memory_mb: int, shm_mb: int, gpu: int, options: KubernetesOptions) -> dict:
    """A copy of TorchX's rendered Volcano Job with the settings its scheduler leaves out."""
    job = copy.deepcopy(job)
    tolerations = [parse_toleration(t) for t in options.tolerations]
    if gpu and not any(t["key"] == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        pod["securityContext"] = {
            "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        # IRSA mounts its own token; nothing in the job talks to the Kubernetes API
        pod["automountServiceAccountToken"] = False
        if tolerations:
            pod["tolerations"] = tolerations
        if options.node_selector:
            pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **options.node_selector}
        if options.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": name} for name in options.image_pull_secrets]
        for volume in pod["volumes"]:
            if volume["name"] == "dshm":
                volume["emptyDir"] = {"medium": "Memory", "sizeLimit": f"{shm_mb}Mi"}
        pod["volumes"].append({"name": "tmp", "emptyDir": {}})
        for container in pod["containers"]:
            resources = container["resources"]
            resources["limits"]["memory"] = resources["requests"]["memory"] = f"{memory_mb}Mi"
            container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
            container["env"] = [*container.get("env", []), {"name": "HOME", "value": "/tmp"}]
            if options.s3_secret:
                container["envFrom"] = [{"secretRef": {"name": options.s3_secret}}]
            context = container.get("securityContext") or {}
            if context.get("privileged"):
                raise ValueError("device mounts make the pod privileged: mount the data as a volume instead")
            container["securityContext"] = {
                "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            }
    return job


def kubernetes_dryrun(app, options: KubernetesOptions):
    """TorchX's dry run of `app` on Kubernetes, with the rendered Job completed; schedule it with the Runner."""
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    cfg = {"queue": options.queue, "namespace": options.namespace}
    if options.service_account:
        cfg["service_account"] = options.service_account
    if options.priority_class:
        cfg["priority_class"] = options.priority_class
    runner = get_runner()
    info = runner.dryrun(app, "kubernetes", cfg=cfg, workspace=None)
    role = app.roles[0]
    info.request.resource = complete_volcano_job(
        sanitize_for_serialization(info.request.resource), memory_mb=role.resource.memMB,
        shm_mb=role.metadata[SHM_CAPABILITY], gpu=role.resource.gpu, options=options,
    )
    return runner, info


def max_world_size(nnodes: str, nproc_per_node: int) -> int:
    return parse_nnodes(nnodes)[1] * nproc_per_node


def stream_logs(runner, handle: str, role: str = "trainer") -> None:
    for line in runner.log_lines(handle, role, k=0, should_tail=True):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
