"""What the project's two cluster schedulers (`kubernetes`: a Volcano Job, `jobset`: a JobSet) share: their run
options, the checks made before an image is built, pushing the workspace image and creating the object with one
clear error each, deleting it, and reading back where a job's run writes.

Each scheduler names its object (API group, version, plural) and where its first container is; the pods inside
are built once, by service/launch/pods.py.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List

from torchx.specs import AppDef, AppDryRunInfo, Role, runopts

from service.errors import JobError
from service.launch.job_spec import SPEC_ENV
from service.launch.pods import check_for_kubernetes
from service.launch.torchx_api import KubernetesScheduler, SubmissionError, dryrun_cfg, images_to_push, run_option
from service.spec import MAX_SPEC_BYTES, StorageSpec, safe_yaml

# where this project's Kubernetes objects (k8s/) put a job unless told otherwise
DEFAULTS = {"namespace": "barlow", "queue": "barlow", "service_account": "barlow-trainer"}


def api_errors() -> tuple[type[BaseException], ...]:
    """What the Kubernetes client raises when the API server refuses or cannot be reached."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return ApiException, HTTPError


def api_detail(error: BaseException) -> str:
    return getattr(error, "reason", None) or (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class ClusterScheduler(KubernetesScheduler):
    """torchx's Kubernetes scheduler (its workspace images, API clients and run-option handling), made to create
    the object a subclass renders."""

    group: str
    version: str
    plural: str
    queue_help: str
    priority_help = "PriorityClass of the job's pods (k8s/ defines barlow-training)"

    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default=DEFAULTS["namespace"], help="Kubernetes namespace of the job")
        opts.add("queue", type_=str, default=DEFAULTS["queue"], help=self.queue_help)
        opts.add("service_account", type_=str, default=DEFAULTS["service_account"],
                 help="the pods' service account (IRSA / workload identity for object storage)")
        opts.add("priority_class", type_=str, help=self.priority_help)
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

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        cfg, images = dryrun_cfg(dryrun_info), images_to_push(dryrun_info)
        try:  # first, apart: a failed push and an unreachable cluster need different fixes
            self.push_images(images)
        except Exception as error:  # noqa: BLE001 (the registry or the Docker API: nothing was created)
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise SubmissionError(
                f"the job was not created: pushing the workspace image to {run_option(cfg, 'image_repo')} failed "
                f"({detail}); check image_repo and that `docker push` to it works") from None
        images.clear()
        namespace = run_option(cfg, "namespace", DEFAULTS["namespace"])
        with warnings.catch_warnings(record=True) as caught:  # torchx warns of a kubeconfig it cannot load
            warnings.simplefilter("always")
            try:
                created = self.custom_objects().create_namespaced_custom_object(
                    group=self.group, version=self.version, namespace=namespace, plural=self.plural,
                    body=dryrun_info.request.resource)
            except api_errors() as error:
                config = [str(w.message) for w in caught if "kube config" in str(w.message)]
                raise SubmissionError(
                    f"the job was not created: the Kubernetes API refused or could not be reached ({api_detail(error)}"
                    f"{'; ' + config[0] if config else ''}); check kubectl's context ($KUBECONFIG or "
                    f"~/.kube/config) and that it may create {self.plural}.{self.group} in namespace {namespace}"
                ) from None
            finally:
                for warning in caught:
                    if "kube config" not in str(warning.message):
                        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return f"{namespace}:{created['metadata']['name']}"

    def _get(self, app_id: str) -> dict:
        """The job NAMESPACE:NAME as the API server returns it, status included; JobError if it cannot."""
        namespace, _, name = app_id.partition(":")
        try:
            return self.custom_objects().get_namespaced_custom_object(
                group=self.group, version=self.version, namespace=namespace, plural=self.plural, name=name)
        except api_errors() as error:
            raise JobError(f"job {app_id}: the Kubernetes API refused or could not be reached ({api_detail(error)}); "
                           "check kubectl's context ($KUBECONFIG or ~/.kube/config) and the job's namespace"
                           ) from None

    def _cancel_existing(self, app_id: str) -> None:
        """Deletes the job and, in the background, its pods."""
        namespace, _, name = app_id.partition(":")
        self.custom_objects().delete_namespaced_custom_object(
            group=self.group, version=self.version, namespace=namespace, plural=self.plural, name=name,
            propagation_policy="Background")

    def first_container(self, job: dict) -> dict:
        """The container of the job's first pod (which carries the spec)."""
        raise NotImplementedError

    def run_location(self, app_id: str) -> tuple[str, StorageSpec] | None:
        """The run.output and storage settings of the job NAMESPACE:NAME, from the resolved spec its first pod's
        container carries (BARLOW_SPEC, read with the spec's bounded YAML loader: whoever may create jobs in the
        namespace wrote it); None when it carries none (a spec image:PATH). JobError when the Kubernetes API
        cannot be asked, has no such job, or the job's spec has no run.output."""
        container = self.first_container(self._get(app_id))
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
