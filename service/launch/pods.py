"""The pod every cluster scheduler of this project runs: torchx's pod for a role, completed and checked.

One builder for both launch targets (the Volcano Job's tasks and the JobSet's indexed Job), so that a fix reaches
both. torchx 0.7.0's `role_to_pod` (reached through service/launch/torchx_api.py) writes the container, its
mounts and /dev/shm; to it `complete_pod` adds what a training job needs:
- memory request = limit, in MiB (torchx writes decimal megabytes and requests 1 GiB less: 0M for small jobs);
- /dev/shm sized (torchx's emptyDir has no limit, so the data loaders' shared memory is unaccounted for);
- tolerations, a node selector, image pull secrets and a Secret of storage credentials, as run options;
- for this project's roles, a non-root, read-only security context with a writable /tmp, and no API token.
`check_for_kubernetes` refuses, before anything is built or created, what no pod can keep: a run.output on the
pod's own disk.
"""

from __future__ import annotations

import posixpath
from typing import Any

from torchx.specs import AppDef, Role

from service.launch.resources import MOUNTS_METADATA, RUN_OUTPUT_METADATA, SHM_CAPABILITY, WORKERS_METADATA
from service.launch.torchx_api import SubmissionError, run_option

RUN_AS_USER = 1000  # the training image's non-root user
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def parse_toleration(text: str) -> dict[str, str]:
    """`key[=value]:Effect` (kubectl's taint form) or `key[:value]:Effect` (for -cfg, where `=` separates options)
    to a toleration. Effect: NoSchedule, PreferNoSchedule or NoExecute."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in EFFECTS or not head:
        raise SubmissionError(f"toleration {text!r} must be key[=value]:Effect (or key[:value]:Effect) with Effect "
                              f"one of {', '.join(EFFECTS)}, e.g. nvidia.com/gpu:NoSchedule")
    key, has_value, value = head.partition("=") if "=" in head else head.partition(":")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def check_for_kubernetes(app: AppDef) -> None:
    """What a cluster cannot run, found before an image is built or a node booked: a run.output on the pod's
    own disk (its checkpoints die with the pod) unless a volume is mounted there."""
    for role in app.roles:
        output = role.metadata.get(RUN_OUTPUT_METADATA)
        if not output or output.startswith("memory://"):
            if output:
                raise SubmissionError(f"run.output={output} is the memory of one process: use object storage "
                                      "(run.output=s3://BUCKET/runs/NAME)")
            continue
        if "://" in output and not output.startswith("file://"):
            continue
        path = posixpath.normpath(posixpath.join("/app", output.removeprefix("file://")))
        mounted = [dst for dst in role.metadata.get(MOUNTS_METADATA, []) if
                   path == posixpath.normpath(dst) or path.startswith(posixpath.normpath(dst).rstrip("/") + "/")]
        if not mounted:
            raise SubmissionError(
                f"run.output={output} is a path on the pod's own disk: its checkpoints would be lost with the pod "
                "and no other node could resume them. Use object storage (run.output=s3://BUCKET/runs/NAME) or a "
                "path under a mounted volume (--mounts type=volume,src=CLAIM,dst=/runs)")


def is_ours(role: Role) -> bool:
    """A role of this project's components, running its image (other components keep their image's user)."""
    return WORKERS_METADATA in role.metadata


def complete_pod(pod: dict, role: Role, cfg: Any) -> dict:
    """`pod` (a pod spec as plain objects, torchx's for `role`), completed in place as the module docstring says."""
    tolerations = [parse_toleration(t) for t in run_option(cfg, "tolerations", [])]
    if role.resource.gpu and not any(t["key"] == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod["tolerations"] = tolerations
    if run_option(cfg, "node_selector"):
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **run_option(cfg, "node_selector")}
    if run_option(cfg, "image_pull_secrets"):
        pod["imagePullSecrets"] = [{"name": name} for name in run_option(cfg, "image_pull_secrets")]
    shm_mb = role.metadata.get(SHM_CAPABILITY)
    for volume in pod["volumes"]:
        if volume["name"] == "dshm" and shm_mb:
            volume["emptyDir"] = {"medium": "Memory", "sizeLimit": f"{shm_mb}Mi"}
    for container in pod["containers"]:
        resources = container["resources"]
        if role.resource.memMB > 0:
            resources["limits"]["memory"] = resources["requests"]["memory"] = f"{role.resource.memMB}Mi"
        if run_option(cfg, "credentials_secret"):
            container["envFrom"] = [{"secretRef": {"name": run_option(cfg, "credentials_secret")}}]
    if is_ours(role):
        _harden(pod)
    return pod


def _harden(pod: dict) -> None:
    """Non-root, read-only root filesystem, no privilege, no API token; /tmp (HOME, compile caches) writable."""
    pod["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["automountServiceAccountToken"] = False  # IRSA mounts its own token; nothing here talks to the API
    pod["volumes"].append({"name": "tmp", "emptyDir": {}})
    for container in pod["containers"]:
        if (container.get("securityContext") or {}).get("privileged"):
            raise SubmissionError("a type=device mount makes the pod privileged: mount the data as a volume instead "
                                  "(type=volume,src=CLAIM,dst=/data)")
        container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
        container["env"] = [*container.get("env", []), {"name": "HOME", "value": "/tmp"}]
        container["securityContext"] = {
            "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
        }
