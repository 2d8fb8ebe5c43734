"""The project's `kubernetes` TorchX scheduler: torchx's Volcano scheduler, completed and checked.

Registered under the `torchx.schedulers` entry point as `kubernetes`, so that `torchx run -s kubernetes` (the
command users already type), `barlow submit` and the Python Runner all render the same Volcano Job. To it torchx
0.7.0's scheduler adds nothing of what a training job needs, so this one does:
- memory request = limit, in MiB (torchx writes decimal megabytes and requests 1 GiB less: 0M for small jobs);
- /dev/shm sized (torchx's emptyDir has no limit, so the data loaders' shared memory is unaccounted for);
- tolerations, a node selector, image pull secrets and a Secret of storage credentials, as run options;
- for an elastic role (nnodes MIN:MAX), Volcano's RestartTask on a lost pod instead of RestartJob;
- for this project's roles, a non-root, read-only security context with a writable /tmp, and no API token.
Before anything is built or created it refuses what cannot work on a cluster: a run.output on the pod's own disk.

Run options (`torchx runopts kubernetes`; set them in .torchxconfig or with -cfg key=value,key=value):
namespace, queue, service_account, priority_class (as torchx's), tolerations, node_selector, image_pull_secrets,
credentials_secret, and the workspace's image_repo and quiet.
"""

from __future__ import annotations

import copy
import posixpath
import warnings
from typing import Any, Dict, List

from torchx.specs import AppDef, AppDryRunInfo, Role, runopts

from service.errors import JobError
from service.launch.job_spec import SPEC_ENV
from service.launch.resources import MOUNTS_METADATA, RUN_OUTPUT_METADATA, SHM_CAPABILITY, WORKERS_METADATA
from service.launch.torchx_api import (
    KubernetesScheduler,
    SubmissionError,
    dryrun_cfg,
    images_to_push,
    run_option,
    to_plain_objects,
)
from service.spec import MAX_SPEC_BYTES, StorageSpec, safe_yaml

RUN_AS_USER = 1000  # the training image's non-root user
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
ROLE_LABEL = "torchx.pytorch.org/role-name"
# where this project's Kubernetes objects (k8s/) put a job unless told otherwise
DEFAULTS = {"namespace": "barlow", "queue": "barlow", "service_account": "barlow-trainer"}


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


def complete_volcano_job(job: dict, app: AppDef, cfg: Any) -> dict:
    """A copy of torchx's rendered Volcano Job with what its scheduler leaves out (see the module docstring)."""
    job = copy.deepcopy(job)
    tolerations = [parse_toleration(t) for t in run_option(cfg, "tolerations", [])]
    roles = {role.name: role for role in app.roles}
    for task in job["spec"]["tasks"]:
        role: Role = roles[task["template"]["metadata"]["labels"][ROLE_LABEL]]
        ours = WORKERS_METADATA in role.metadata  # a role of this project's components, running its image
        pod = task["template"]["spec"]
        task_tolerations = list(tolerations)
        if role.resource.gpu and not any(t["key"] == "nvidia.com/gpu" for t in task_tolerations):
            task_tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
        if task_tolerations:
            pod["tolerations"] = task_tolerations
        if task.get("policies") and role.min_replicas is not None and role.min_replicas < role.num_replicas:
            # elastic: the nodes left go on (torchrun re-forms the rendezvous); only the lost pod is recreated,
            # and joins at the next rendezvous. A fixed-size job keeps torchx's RestartJob: it cannot go on.
            task["policies"] = [{"event": event, "action": "RestartTask"} for event in ("PodEvicted", "PodFailed")]
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
        if ours:
            _harden(pod)
    return job


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


class BarlowKubernetesScheduler(KubernetesScheduler):
    """torchx's Kubernetes (Volcano) scheduler with the completion and checks above."""

    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default=DEFAULTS["namespace"], help="Kubernetes namespace of the job")
        opts.add("queue", type_=str, default=DEFAULTS["queue"], help="Volcano queue of the job")
        opts.add("service_account", type_=str, default=DEFAULTS["service_account"],
                 help="the pods' service account (IRSA / workload identity for object storage)")
        opts.add("priority_class", type_=str, help="PriorityClass of the job (k8s/ defines barlow-training)")
        opts.add("tolerations", type_=List[str],
                 help="taints the pods tolerate, key[=value]:Effect or key[:value]:Effect, separated by ; "
                 "(nvidia.com/gpu:NoSchedule is added for GPU jobs)")
        opts.add("node_selector", type_=Dict[str, str], help="node labels the pods need, label:value;label:value")
        opts.add("image_pull_secrets", type_=List[str], help="Secrets to pull the image with, separated by ;")
        opts.add("credentials_secret", type_=str,
                 help="Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) become the workers' "
                 "environment; leave unset with IRSA")
        return opts

    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Any) -> None:
        check_for_kubernetes(AppDef(name="check", roles=[role]))  # before minutes of image building
        super().build_workspace_and_update_role(role, workspace, cfg)

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo:
        check_for_kubernetes(app)
        with warnings.catch_warnings():
            # torchx warns of a Volcano 1.4 retry bug for every role with retries; Volcano >= 1.6 is required here
            warnings.filterwarnings("ignore", message=r"\s*Role .* configured with restarts")
            info = super()._submit_dryrun(app, cfg)
        info.request.resource = complete_volcano_job(to_plain_objects(info.request.resource), app, cfg)
        return info

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        cfg, images = dryrun_cfg(dryrun_info), images_to_push(dryrun_info)
        try:  # first, apart: a failed push and an unreachable cluster need different fixes
            self.push_images(images)
        except Exception as error:  # noqa: BLE001 (the registry or the Docker API: nothing was created)
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise SubmissionError(
                f"the job was not created: pushing the workspace image to {run_option(cfg, 'image_repo')} failed "
                f"({detail}); check image_repo and that `docker push` to it works") from None
        images.clear()
        with warnings.catch_warnings(record=True) as caught:  # torchx warns of a kubeconfig it cannot load
            warnings.simplefilter("always")
            try:
                return super().schedule(dryrun_info)
            except (ApiException, HTTPError) as error:
                detail = getattr(error, "reason", None) or str(error).strip().splitlines()[0][:200]
                config = [str(w.message) for w in caught if "kube config" in str(w.message)]
                raise SubmissionError(
                    f"the job was not created: the Kubernetes API refused or could not be reached ({detail}"
                    f"{'; ' + config[0] if config else ''}); check kubectl's context ($KUBECONFIG or "
                    "~/.kube/config) and that it may create Volcano jobs in namespace "
                    f"{run_option(cfg, 'namespace', DEFAULTS['namespace'])}") from None
            finally:
                for warning in caught:
                    if "kube config" not in str(warning.message):
                        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def run_location(self, app_id: str) -> tuple[str, StorageSpec] | None:
        """The run.output and storage settings of the job NAMESPACE:NAME, from the resolved spec its first task's
        container carries (BARLOW_SPEC, read with the spec's bounded YAML loader: whoever may create jobs in the
        namespace wrote it); None when it carries none (a spec image:PATH). ValueError when the Kubernetes API
        cannot be asked, has no such job, or the job's spec has no run.output."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        namespace, _, name = app_id.partition(":")
        try:
            job = self._custom_objects_api().get_namespaced_custom_object(
                group="batch.volcano.sh", version="v1alpha1", namespace=namespace, plural="jobs", name=name)
        except (ApiException, HTTPError) as error:
            detail = getattr(error, "reason", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise JobError(f"job {app_id}: the Kubernetes API refused or could not be reached ({detail}); check "
                             "kubectl's context ($KUBECONFIG or ~/.kube/config) and the job's namespace") from None
        container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
        text = next((item.get("value") for item in container.get("env") or [] if item["name"] == SPEC_ENV), None)
        if not text:
            return None
        if len(text) > MAX_SPEC_BYTES:
            raise JobError(f"job {app_id}: its {SPEC_ENV} is larger than a spec ({MAX_SPEC_BYTES:,} bytes)")
        spec = safe_yaml(text, f"job {app_id}'s {SPEC_ENV}")
        run = spec.get("run") if isinstance(spec, dict) else None
        if not isinstance(run, dict) or not isinstance(run.get("output"), str):
            raise JobError(f"job {app_id}: its {SPEC_ENV} is not a spec with a run.output")
        return run["output"], StorageSpec.model_validate(spec.get("storage") or {})


def create_scheduler(session_name: str, **kwargs: Any) -> BarlowKubernetesScheduler:
    return BarlowKubernetesScheduler(session_name=session_name, client=kwargs.get("client"),
                                     docker_client=kwargs.get("docker_client"))
