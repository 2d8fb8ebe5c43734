"""Every TorchX API this project relies on beyond the documented component and Runner interfaces, in one module.

torchx 0.7.0 is the last release. Its main branch (0.8) turns `KubernetesOpts` from a TypedDict into a structured
dataclass and passes that to `_submit_dryrun`: `run_option` is the one place that reads a run option, so that
change is one function here. The other names below are module internals of torchx 0.7.0 (the Kubernetes
scheduler class and its serializer, the component-validation error its CLI prints without a traceback, the
`.torchxconfig` reader its CLI applies): when a torchx upgrade moves one, this module is the only one to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchx.runner.config import apply as _apply_torchxconfig
from torchx.runner.config import load_sections as _load_sections
from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler as _KubernetesScheduler
from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization as _sanitize_for_serialization
from torchx.specs.finder import ComponentValidationException

from service.errors import UserError

__all__ = ["KubernetesScheduler", "SubmissionError", "apply_torchxconfig", "component_defaults", "dryrun_app",
           "dryrun_cfg", "images_to_push", "run_option", "to_plain_objects"]


# Between two events of a push stream: the first push of the training image uploads ~6 GB of layers, gzipped on
# the submitting machine, and docker-py's default (60 s) ends it midway.
IMAGE_PUSH_TIMEOUT_S = 3600


class KubernetesScheduler(_KubernetesScheduler):
    """torchx's Kubernetes scheduler with its workspace images' Docker client made here: torchx 0.7.0's
    DockerWorkspaceMixin reads the internal `_docker_client` property and gives it no timeout setting."""

    def __init__(self, session_name: str, client: Any = None, docker_client: Any = None) -> None:
        super().__init__(session_name, client=client, docker_client=docker_client)
        self._images_client = docker_client

    @property
    def _docker_client(self) -> Any:
        if self._images_client is None:
            import docker

            self._images_client = docker.from_env(timeout=IMAGE_PUSH_TIMEOUT_S)
        return self._images_client


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
