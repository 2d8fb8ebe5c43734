"""`barlow submit`: the same TorchX component, scheduler and defaults as `torchx run`, driven from Python.

It hands the component its arguments as the torchx CLI does (strings), applies .torchxconfig as the CLI does,
and lets the Runner render, check and create the job: `barlow submit ... --scheduler kubernetes` and
`torchx run -s kubernetes barlowtwins.train ...` submit the same Volcano Job.
"""

from __future__ import annotations

import sys
from typing import Any

from torchx.runner import Runner, get_runner

from service.launch.torchx_api import apply_torchxconfig, component_defaults
from service.spec import EvaluateSpec


def component_for(kind: type) -> str:
    """The component that launches a spec of this kind (EvaluateSpec or TrainSpec)."""
    return "barlowtwins.evaluate" if kind is EvaluateSpec else "barlowtwins.train"


def runner() -> Runner:
    return get_runner(component_defaults=component_defaults())


def dryrun(component: str, arguments: list[str], scheduler: str, cfg: dict[str, Any], workspace: str | None = None):
    """The Runner with the job `torchx run -s SCHEDULER COMPONENT ARGUMENTS` would submit (not yet submitted)."""
    cfg = dict(cfg)
    apply_torchxconfig(scheduler, cfg)
    session = runner()
    info = session.dryrun_component(component, arguments, scheduler, cfg=cfg, workspace=workspace or None)
    return session, info


def stream_logs(session: Runner, handle: str, role: str = "trainer") -> None:
    for line in session.log_lines(handle, role, k=0, should_tail=True):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
