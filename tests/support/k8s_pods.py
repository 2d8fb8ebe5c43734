"""A rendered Volcano Job's pods, run as containers with podman: what a cluster's kubelet and Volcano would do.

Why `podman run` and not `podman kube play`: podman 4.3.1's kube play drops what these pods rely on. An emptyDir
becomes a named volume on the host's disk, shared by every pod that names it (`tmp`, `dshm`); `medium: Memory`
and `sizeLimit` are ignored and /dev/shm is left root-owned, unwritable by the pods' user 1000; `runAsNonRoot`,
`fsGroup` and `subdomain` are ignored; and a Secret it plays cannot be read by a pod. So each pod template is
translated, field by field, into one `podman run`, and a field the translation does not know fails the test
rather than being dropped.

What Volcano adds to every pod, given here as its plugins do (batch.volcano.sh `env` and `svc`):
- env plugin: VK_TASK_INDEX and VC_TASK_INDEX, the pod's index within its task (each task has one replica: 0);
- svc plugin: VC_<TASK>_HOSTS (the task's pods' host names, `<job>-<task>-<index>.<job>`) and VC_<TASK>_NUM for
  every task of the job; the pod's hostname is its name and its subdomain the job's, which a headless Service
  makes resolvable: here the container's name, and `<pod>.<job>` a network alias on the podman network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POD_FIELDS = {"containers", "restartPolicy", "volumes", "securityContext", "serviceAccountName", "nodeSelector",
              "tolerations", "imagePullSecrets", "automountServiceAccountToken"}
# what only a scheduler or the API server acts on: no container sees it (there is no API server here)
SCHEDULING_FIELDS = {"serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets",
                     "automountServiceAccountToken"}
CONTAINER_FIELDS = {"name", "image", "command", "env", "envFrom", "ports", "resources", "securityContext",
                    "volumeMounts"}


@dataclass
class Pod:
    name: str
    run_arguments: list[str]  # `podman run ...` without "run"


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"([0-9]+)Mi", quantity)
    assert match, f"quantity {quantity!r}: the scheduler writes memory in Mi"
    return int(match.group(1))


def volcano_env(job: dict) -> dict[str, str]:
    """What Volcano's svc plugin gives every pod of `job`."""
    name = job["metadata"]["name"]
    env = {}
    for task in job["spec"]["tasks"]:
        key = re.sub(r"[^A-Z0-9]", "_", task["name"].upper())
        env[f"VC_{key}_HOSTS"] = ",".join(f"{name}-{task['name']}-{i}.{name}" for i in range(task["replicas"]))
        env[f"VC_{key}_NUM"] = str(task["replicas"])
    return env


def pods(job: dict, network: str, secrets: dict[str, dict[str, str]], max_cpus: int) -> list[Pod]:
    """One podman run per task (each has one replica). `secrets`: the cluster's Secrets by name (their keys and
    values; each key becomes a podman secret delivered as an environment variable, as envFrom does)."""
    job_name = job["metadata"]["name"]
    shared_env = volcano_env(job)
    result = []
    for task in job["spec"]["tasks"]:
        assert task["replicas"] == 1
        pod_name = f"{job_name}-{task['name']}-0"
        spec = task["template"]["spec"]
        assert set(spec) <= POD_FIELDS, f"pod fields not translated: {set(spec) - POD_FIELDS}"
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["containers"]
        untranslated = set(container) - CONTAINER_FIELDS
        assert not untranslated, f"container fields not translated: {untranslated}"
        arguments = ["-d", "--name", pod_name, "--hostname", pod_name, "--network", network,
                     "--network-alias", f"{pod_name}.{job_name}", "--restart", "no"]
        arguments += _security(spec.get("securityContext", {}), container.get("securityContext", {}))
        arguments += _volumes(spec["volumes"], container["volumeMounts"])
        arguments += _resources(container["resources"], max_cpus)
        env = {**shared_env, "VK_TASK_INDEX": "0", "VC_TASK_INDEX": "0"}
        env.update({item["name"]: item["value"] for item in container.get("env", [])})
        arguments += [part for key, value in env.items() for part in ("-e", f"{key}={value}")]
        for source in container.get("envFrom", []):
            secret = source["secretRef"]["name"]
            for key in secrets[secret]:
                arguments += ["--secret", f"{podman_secret_name(secret, key)},type=env,target={key}"]
        # ports need no publishing: pods reach each other's ports on the network, as on a cluster's pod network
        entrypoint, *rest = container["command"]
        arguments += ["--entrypoint", entrypoint, container["image"], *rest]
        result.append(Pod(pod_name, arguments))
    return result


def podman_secret_name(secret: str, key: str) -> str:
    return f"{secret}.{key}".lower().replace("_", "-")


def _security(pod: dict, container: dict) -> list[str]:
    arguments = []
    user, group = pod.get("runAsUser"), pod.get("runAsGroup")
    if pod.get("runAsNonRoot") or container.get("runAsNonRoot"):
        assert user not in (None, 0), "runAsNonRoot needs a numeric non-root runAsUser (the kubelet checks it)"
    if user is not None:
        arguments += ["--user", f"{user}:{group if group is not None else user}"]
    if pod.get("fsGroup") is not None:
        arguments += ["--group-add", str(pod["fsGroup"])]
    assert pod.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}  # podman's default
    assert not container.get("privileged")
    if container.get("readOnlyRootFilesystem"):
        arguments += ["--read-only", "--read-only-tmpfs=false"]  # only the volumes below are writable
    if container.get("allowPrivilegeEscalation") is False:
        arguments += ["--security-opt", "no-new-privileges"]
    for capability in container.get("capabilities", {}).get("drop", []):
        arguments += ["--cap-drop", capability]
    assert not container.get("capabilities", {}).get("add")
    return arguments


def _volumes(volumes: list[dict], mounts: list[dict]) -> list[str]:
    by_name = {volume["name"]: volume for volume in volumes}
    arguments = []
    for mount in mounts:
        volume = by_name[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"volume {volume} is not an emptyDir (no claims in this test)"
        empty_dir = volume["emptyDir"]
        if mount["mountPath"] == "/dev/shm":
            assert empty_dir.get("medium") == "Memory"
            arguments += ["--shm-size", f"{_mebibytes(empty_dir['sizeLimit'])}m"]
        else:  # the pod's own scratch space: private to it, empty at start, writable by its user
            size = f",size={_mebibytes(empty_dir['sizeLimit'])}m" if "sizeLimit" in empty_dir else ""
            arguments += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777{size}"]
    return arguments


def _resources(resources: dict, max_cpus: int) -> list[str]:
    limits = resources.get("limits", {})
    assert "nvidia.com/gpu" not in limits, "CPU workers only"
    arguments = []
    if "memory" in limits:
        arguments += ["--memory", f"{_mebibytes(limits['memory'])}m"]
    if "cpu" in limits:
        millicpus = int(limits["cpu"].removesuffix("m"))
        arguments += ["--cpus", str(min(millicpus / 1000, max_cpus))]  # podman refuses more than the machine has
    return arguments
