"""`barlow` and `torchx` command lines, in this process or as the executables; the Volcano Jobs that `torchx run
--dryrun -s kubernetes` and `barlow submit --dryrun` render, and how to read them: the container's torchrun command
(parsed by torchrun's own parser), its environment, the spec it ships.

Both CLIs run either as the real executables in a subprocess (`executable=True`) or in this process through the
same entry points (`torchx.cli.main.main`, `service.cli.main.main`). In this process the arguments take the same way
as in the executable: torchx's CLI parses the component's arguments from its signature and hands Optional[int]
ones over as strings ("8"); only calling the component from Python would not show that. What the subprocess adds
(the exit status of the executable, stderr as a user sees it, the import of the entry point) the tests in
tests/e2e check once per command; an exception other than the CLI's own exit escapes here instead of printing a
traceback, and fails the test that way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.runs import ROOT

BIN = Path(sys.executable).parent
TORCHX, BARLOW = str(BIN / "torchx"), str(BIN / "barlow")
REQUEST_MARK = "=== SCHEDULER REQUEST ===\n"
NO_CLUSTER = {"KUBECONFIG": "/nonexistent"}  # no job is ever created from a test
# Every argument of the TorchX components, each with a value other than its default, as a user types it (the
# components' tests check that it names them all, and `barlow submit`'s that it has an option for each)
EVERY_ARGUMENT = {
    "spec": None,  # per component: the tests choose one
    "overrides": None,
    "image": ["--image", "registry.example.com:5000/barlow/trainer:1.2"],
    "nnodes": ["--nnodes", "2:3"],
    "nproc_per_node": ["--nproc_per_node", "4"],
    "h": None,  # a named resource replaces gpu/cpu/memMB: a run of its own
    "gpu": ["--gpu", "4"],
    "cpu": ["--cpu", "40"],
    "memMB": ["--memMB", "300000"],
    "shmMB": ["--shmMB", "20000"],
    "max_restarts": ["--max_restarts", "7"],
    "max_retries": ["--max_retries", "2"],
    "rdzv_port": ["--rdzv_port", "29611"],
    "env": ["--env", "AWS_REGION=eu-west-1,NCCL_DEBUG=INFO"],
    "mounts": ["--mounts", "type=volume,src=imagenet,dst=/data/imagenet,readonly"],
    "name": ["--name", "bt-cli"],
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _process_state(cwd: Path, env: dict[str, str | None]) -> Iterator[None]:
    """The working folder and environment variables (None: unset) of a command line, restored afterwards (torchx
    sets TORCHX_CONTEXT_NAME itself). s3fs caches filesystems by their options, not by the environment: a new
    process would not find one cached with other credentials."""
    from s3fs import S3FileSystem

    saved = dict(os.environ)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    S3FileSystem.clear_instance_cache()
    try:
        with contextlib.chdir(cwd):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        S3FileSystem.clear_instance_cache()


def _in_process(main, argv: list[str], cwd: Path, env: dict[str, str | None], log_level: int) -> Result:
    """`main(argv)` with stdout, stderr and the root logger's records from `log_level` on captured, as the
    executable prints them to stderr; its return value or SystemExit code as the exit status. The service's logger,
    which `barlow` points at the stderr of its call, is put back as it was (caplog of later tests reads it)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setLevel(log_level)
    root, service = logging.getLogger(), logging.getLogger("barlow")
    level = root.level
    service_handlers, service_level, service_propagates = list(service.handlers), service.level, service.propagate
    root.addHandler(handler)
    root.setLevel(log_level)
    try:
        with _process_state(cwd, env), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main(argv) or 0
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        service.handlers[:] = service_handlers
        service.setLevel(service_level)
        service.propagate = service_propagates
    return Result(returncode, stdout.getvalue(), stderr.getvalue())


def _subprocess(command: list[str], cwd: Path, env: dict[str, str | None], timeout: float) -> Result:
    environ = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)
    return Result(done.returncode, done.stdout, done.stderr)


def torchx(*argv: str, cwd: Path = ROOT, env: dict | None = None, executable: bool = False,
           timeout: float = 300) -> Result:
    """`torchx ARGV`: the executable (a run past `timeout` fails), or its entry point in this process; never a
    cluster. `env` adds to this process's environment (None: unset)."""
    env = {**NO_CLUSTER, **(env or {})}
    if executable:
        return _subprocess([TORCHX, *argv], cwd, env, timeout)
    from torchx.cli.argparse_util import ArgOnceAction, torchxconfig
    from torchx.cli.main import main

    # torchx 0.7's CLI keeps per-process state a second call would trip on: the options seen ("specified more
    # than once") and the [cli:run] section of the first working folder's .torchxconfig
    torchxconfig.called_args.clear()
    torchxconfig._subcmd_configs.clear()
    ArgOnceAction.called_args.clear()
    return _in_process(main, list(argv), cwd, env, logging.INFO)  # torchx's CLI: basicConfig(level="INFO")


def barlow(*argv: str, cwd: Path = ROOT, env: dict | None = None, executable: bool = False,
           timeout: float = 300) -> Result:
    """`barlow ARGV`: the executable (a run past `timeout` fails), or service.cli.main.main in this process; never a
    cluster. `env` adds to this process's environment (None: unset)."""
    env = {**NO_CLUSTER, **(env or {})}
    if executable:
        return _subprocess([BARLOW, *argv], cwd, env, timeout)
    from service.cli.main import main

    return _in_process(main, list(argv), cwd, env, logging.WARNING)  # Python's last-resort handler


def torchx_job(component: str, *arguments: str, cwd: Path = ROOT, env: dict | None = None,
               executable: bool = False, scheduler: str = "kubernetes") -> dict:
    """The Volcano Job (the JobSet with scheduler="jobset") `torchx run --dryrun -s SCHEDULER COMPONENT ARGUMENTS`
    prints; -cfg options go before the component in `arguments`."""
    result = torchx("run", "--workspace", "", "--dryrun", "-s", scheduler, component, *arguments, cwd=cwd,
                    env=env, executable=executable)
    assert result.returncode == 0 and REQUEST_MARK in result.stdout, result.stderr[-3000:]
    return yaml.safe_load(result.stdout.split(REQUEST_MARK, 1)[1])


def barlow_job(*arguments: str, cwd: Path = ROOT, env: dict | None = None, executable: bool = False,
               scheduler: str = "kubernetes") -> dict:
    """The Volcano Job (or JobSet) `barlow submit ARGUMENTS --scheduler SCHEDULER --dryrun` prints."""
    result = barlow("submit", *arguments, "--scheduler", scheduler, "--dryrun", cwd=cwd, env=env,
                    executable=executable)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def pod_templates(job: dict) -> list[dict]:
    """The pod templates of a Volcano Job (one per task) or a JobSet (one per replicated Job)."""
    if job["kind"] == "JobSet":
        return [replicated["template"]["spec"]["template"] for replicated in job["spec"]["replicatedJobs"]]
    return [task["template"] for task in job["spec"]["tasks"]]


def containers(job: dict) -> list[dict]:
    return [template["spec"]["containers"][0] for template in pod_templates(job)]


def torchrun_arguments(container: dict):
    """The container's torchrun command line (service.launch.torchrun: torchrun's entry point with the user's
    error passed on), parsed by torchrun's own parser; `${VAR:=default}` as bash leaves it when VAR is unset (the
    first node)."""
    from torch.distributed.run import get_args_parser

    assert container["command"][:2] == ["bash", "-c"]
    argv = shlex.split(re.sub(r"\$\{\w+:=([^}]*)\}", r"\1", container["command"][2]))
    assert argv[:4] == ["exec", "python", "-m", "service.launch.torchrun"], argv[:4]
    return get_args_parser().parse_args(argv[4:])


def environment(container: dict) -> dict[str, str]:
    """The container's plain variables (not those the downward API fills in)."""
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def shipped_spec(container: dict) -> dict:
    """The spec the pods will read, checked against the digest that travels with it."""
    from service.spec import spec_digest

    env = environment(container)
    assert spec_digest(env["BARLOW_SPEC"]) == env["BARLOW_SPEC_SHA256"]
    return yaml.safe_load(env["BARLOW_SPEC"])


def volume_of(pod: dict, mount_path: str) -> dict:
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return {**volume, "readOnly": mount.get("readOnly", False)}


def normalised(job: dict) -> dict:
    """The job with its unique name (make_unique's random suffix, in labels, TORCHX_JOB_ID, --rdzv_id) fixed."""
    name = job["metadata"]["name"]
    return yaml.safe_load(yaml.safe_dump(job).replace(name, "JOB"))
