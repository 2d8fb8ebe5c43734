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
from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler
from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization as _sanitize_for_serialization
from torchx.specs.finder import ComponentValidationException

__all__ = ["KubernetesScheduler", "SubmissionError", "apply_torchxconfig", "component_defaults", "run_option",
           "to_plain_objects"]


class SubmissionError(ComponentValidationException, ValueError):
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
    """The Kubernetes client's models (V1Pod, ...) inside a rendered job as plain dicts and lists, as the API gets them."""
    return _sanitize_for_serialization(resource)


def apply_torchxconfig(scheduler: str, cfg: dict[str, Any]) -> None:
    """Fill `cfg` with the `[scheduler]` section of .torchxconfig (the working directory's, or $TORCHXCONFIG),
    keeping the values already set: what `torchx run` does before it calls the Runner."""
    _apply_torchxconfig(scheduler=scheduler, cfg=cfg)


def component_defaults() -> dict[str, dict[str, str]]:
    """The `[component:NAME]` sections of .torchxconfig: the argument defaults `torchx run` gives each component."""
    return _load_sections(prefix="component")
