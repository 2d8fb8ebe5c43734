"""Every TorchX API this project relies on beyond the documented component and Runner interfaces, in one module.

torchx 0.7.0 is the last release. Its main branch (0.8) turns `KubernetesOpts` from a TypedDict into a structured
dataclass and passes that to `_submit_dryrun`: `run_option` is the one place that reads a run option, so that
change is one function here. The other names below are module internals of torchx 0.7.0 (the Kubernetes
scheduler class and its serializer, the component-validation error its CLI prints without a traceback, the
`.torchxconfig` reader its CLI applies, the pod builder and labels of its Kubernetes scheduler, which the JobSet
scheduler shares, and its job-name helpers): when a torchx upgrade moves one, this module is the only one to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torchx.runner.config import apply as _apply_torchxconfig
from torchx.runner.config import load_sections as _load_sections
from torchx.schedulers.api import filter_regex as _filter_regex
from torchx.schedulers.api import split_lines as _split_lines
from torchx.schedulers.ids import make_unique as _make_unique
from torchx.schedulers.kubernetes_scheduler import LABEL_REPLICA_ID as _LABEL_REPLICA_ID
from torchx.schedulers.kubernetes_scheduler import KubernetesJob as _KubernetesJob
from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler as _KubernetesScheduler
from torchx.schedulers.kubernetes_scheduler import pod_labels as _pod_labels
from torchx.schedulers.kubernetes_scheduler import role_to_pod as _role_to_pod
from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization as _sanitize_for_serialization
from torchx.specs.finder import ComponentValidationException
from torchx.util.strings import normalize_str as _normalize_str

from service.errors import UserError

__all__ = ["KubernetesScheduler", "SubmissionError", "apply_torchxconfig", "component_defaults", "dryrun_app",
           "dryrun_cfg", "filter_lines", "images_to_push", "kubernetes_request", "pod_for_role", "pod_labels",
           "run_option", "split_lines", "to_plain_objects", "unique_job_name"]


# Between two events of a push stream: the first push of the training image uploads ~6 GB of layers, gzipped on
# the submitting machine, and docker-py's default (60 s) ends it midway.
IMAGE_PUSH_TIMEOUT_S = 3600


class KubernetesScheduler(_KubernetesScheduler):
    """torchx's Kubernetes scheduler with its workspace images' Docker client made here (torchx 0.7.0's
    DockerWorkspaceMixin reads the internal `_docker_client` property and gives it no timeout setting), and its
    internal API clients and kubeconfig context reached through public methods."""

    def __init__(self, session_name: str, client: Any = None, docker_client: Any = None) -> None:
        super().__init__(session_name, client=client, docker_client=docker_client)
        self._images_client = docker_client

    @property
    def _docker_client(self) -> Any:
        if self._images_client is None:
            import docker

            self._images_client = docker.from_env(timeout=IMAGE_PUSH_TIMEOUT_S)
        return self._images_client

    def custom_objects(self) -> Any:
        """The Kubernetes client's CustomObjectsApi on torchx's API client (kubeconfig loaded once)."""
        return self._custom_objects_api()

    def core_api(self) -> Any:
        """The Kubernetes client's CoreV1Api (pods and their logs) on the same API client."""
        from kubernetes import client

        return client.CoreV1Api(self._api_client())

    def context_namespace(self) -> str | None:
        """The namespace of kubectl's current context, if it names one."""
        return (self._get_active_context().get("context") or {}).get("namespace")


def images_to_push(dryrun_info: Any) -> dict:
    """The workspace images a Kubernetes dry run will push: {local image: (repository, tag)}; schedule pushes
    what is left in it."""
    return dryrun_info.request.images_to_push


def dryrun_cfg(dryrun_info: Any) -> Any:
    """The resolved run options a dry run was made with."""
    return dryrun_info._cfg


def dryrun_app(dryrun_info: Any) -> Any:
    """The AppDef a dry run was made of (its roles as the scheduler got them)."""
    return dryrun_info._app


class SubmissionError(ComponentValidationException, UserError, ValueError):
    """A job that must not be created: `torchx run` prints this one message and exits 1 (its CLI catches
    ComponentValidationException and nothing else without a traceback); `barlow submit` prints it and exits 2."""


def run_option(cfg: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    """One resolved run option: a mapping in torchx 0.7 (KubernetesOpts is a TypedDict), attributes in 0.8."""
    if isinstance(cfg, Mapping):
        value = cfg.get(name)
    else:
        value = getattr(cfg, name, None)
    return default if value is None else value


def to_plain_objects(resource: object) -> Any:
    """The Kubernetes client's models (V1Pod, ...) in a rendered job as plain dicts and lists, as the API gets them."""
    return _sanitize_for_serialization(resource)


def apply_torchxconfig(scheduler: str, cfg: dict[str, Any]) -> None:
    """Fill `cfg` with the `[scheduler]` section of .torchxconfig (the working directory's, or $TORCHXCONFIG),
    keeping the values already set: what `torchx run` does before it calls the Runner."""
    _apply_torchxconfig(scheduler=scheduler, cfg=cfg)


def component_defaults() -> dict[str, dict[str, str]]:
    """The `[component:NAME]` sections of .torchxconfig: the argument defaults `torchx run` gives each component."""
    return _load_sections(prefix="component")


def unique_job_name(app_name: str, suffix_length: int = 0) -> str:
    """The app's name with torchx's random suffix (of `suffix_length` characters; 0: torchx's 64-bit one, 10 to 14
    characters), made a Kubernetes name as its Kubernetes scheduler makes it."""
    return _normalize_str(_make_unique(app_name, suffix_length))


def pod_for_role(container_name: str, role: Any, service_account: str | None) -> dict:
    """torchx's pod for a role (its macros already applied), as plain objects: what its Volcano tasks run."""
    return to_plain_objects(_role_to_pod(container_name, role, service_account))


def pod_labels(app: Any, role_index: int, role: Any, app_id: str) -> dict[str, str]:
    """The labels torchx gives the pods of a role, but the replica's index (one template serves every replica)."""
    labels = _pod_labels(app=app, role_idx=role_index, role=role, replica_id=0, app_id=app_id)
    labels.pop(_LABEL_REPLICA_ID)
    return labels


def split_lines(text: str) -> list[str]:
    """A log as torchx's schedulers hand it over: lines, each with its newline."""
    return _split_lines(text)


def filter_lines(lines: Iterable[str], regex: str | None) -> Iterable[str]:
    """The lines that match `regex`, all of them without one (torchx log --regex)."""
    return _filter_regex(regex, lines) if regex else lines


def kubernetes_request(resource: dict, images_to_push: dict) -> Any:
    """A dry run's request as torchx's Kubernetes scheduler makes it: the object, and the workspace images that
    `schedule` pushes (printed by `torchx run --dryrun` as the object's YAML)."""
    return _KubernetesJob(resource=resource, images_to_push=images_to_push)
