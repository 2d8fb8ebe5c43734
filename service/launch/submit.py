"""`barlow submit`: the same TorchX component, scheduler and defaults as `torchx run`, driven from Python.

It hands the component its arguments as the torchx CLI does (strings), applies .torchxconfig as the CLI does,
and lets the Runner render, check and create the job: `barlow submit ... --scheduler kubernetes` and
`torchx run -s kubernetes barlowtwins.train ...` submit the same Volcano Job (`jobset`: the same JobSet).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import yaml
from torchx.runner import Runner, get_runner
from torchx.specs import AppDryRunInfo

from service.launch.torchx_api import SubmissionError, apply_torchxconfig, component_defaults, dryrun_app
from service.spec import EvaluateSpec, reading_each_spec_once, spec_kind

LIST_ARGUMENTS = ("env", "mounts")  # the components take these as one comma-separated string


def component_for(kind: type) -> str:
    """The component that launches a spec of this kind (EvaluateSpec or TrainSpec)."""
    return "barlowtwins.evaluate" if kind is EvaluateSpec else "barlowtwins.train"


def component_arguments(values: dict[str, Any], overrides: list[str]) -> list[str]:
    """The component's arguments as the torchx CLI hands them over: `--name value` strings, only those given (lists
    joined by commas), then the spec overrides as its trailing arguments."""
    arguments = []
    for parameter, value in values.items():
        if parameter in LIST_ARGUMENTS:
            value = ",".join(value) or None
        if value is not None:
            arguments += [f"--{parameter}", str(value)]
    return arguments + list(overrides)


class _WithoutAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def runner() -> Runner:
    return get_runner(component_defaults=component_defaults())


def dryrun(component: str, arguments: list[str], scheduler: str, cfg: dict[str, Any], workspace: str | None = None):
    """The Runner with the job `torchx run -s SCHEDULER COMPONENT ARGUMENTS` would submit (not yet submitted)."""
    cfg = dict(cfg)
    apply_torchxconfig(scheduler, cfg)
    session = runner()
    info = session.dryrun_component(component, arguments, scheduler, cfg=cfg, workspace=workspace or None)
    return session, info


@dataclass
class Submission:
    """A job rendered and checked by the scheduler, not yet created."""

    session: Runner
    info: AppDryRunInfo
    scheduler: str

    @classmethod
    def prepare(cls, spec: str, arguments: dict[str, Any], overrides: list[str], scheduler: str,
                run_options: dict[str, Any], workspace: str | None = None) -> Submission:
        """`spec` is the component's spec argument (a path, a URL or image:PATH); the component follows its kind."""
        with reading_each_spec_once():  # the kind chosen here and the component's validation: one read
            component = component_for(spec_kind(spec.removeprefix("image:"), overrides))
            session, info = dryrun(component, component_arguments({"spec": spec, **arguments}, overrides), scheduler,
                                   run_options, workspace=workspace)
        return cls(session, info, scheduler)

    def describe(self) -> str:
        """What would be created: the Kubernetes resource as YAML (every object written out where it recurs, as
        `kubectl get -o yaml` shows it, not as a YAML alias), or the local scheduler's request."""
        resource = getattr(self.info.request, "resource", None)
        if not isinstance(resource, dict):
            return f"{self.info}\n"
        return yaml.dump(resource, Dumper=_WithoutAliases, sort_keys=False)

    def create(self) -> str:
        """Creates the job; its handle. A SubmissionError carries the scheduler's one-line reason; any other error
        on the way is raised as one (the job was not created)."""
        try:
            return self.session.schedule(self.info)
        except SubmissionError:
            raise
        except Exception as error:  # noqa: BLE001 (anything else on the way: the job was not created)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise SubmissionError(f"the job was not created: {type(error).__name__}: {first_line}") from error

    def follow(self, handle: str) -> str:
        """Streams the first role's logs until the job ends; its final state (SUCCEEDED, FAILED, ...)."""
        stream_logs(self.session, handle, role=dryrun_app(self.info).roles[0].name)
        status = self.session.wait(handle, wait_interval=1)
        return status.state.name if status else "UNKNOWN"


def stream_logs(session: Runner, handle: str, role: str = "trainer") -> None:
    for line in session.log_lines(handle, role, k=0, should_tail=True):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
