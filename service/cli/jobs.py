"""`barlow submit`, `barlow logs` and `barlow cancel`: TorchX jobs. The spec is read and checked here, before
anything is launched. TorchX is imported inside the handlers, so that the other commands do not load it."""

from __future__ import annotations

import argparse

from service.errors import SpecError

CLUSTER_SCHEDULERS = ("kubernetes", "jobset")  # a job there outlives `barlow submit`: `barlow status` follows it

# the components' arguments (barlowtwins.train / .evaluate) but the spec and its overrides, and the barlow submit
# options that give them
COMPONENT_ARGUMENTS = {"image": "image", "nnodes": "nnodes", "nproc_per_node": "nproc_per_node",
                       "h": "named_resource", "gpu": "gpu", "cpu": "cpu", "memMB": "mem_mb", "shmMB": "shm_mb",
                       "max_restarts": "max_restarts", "max_retries": "max_retries", "rdzv_port": "rdzv_port",
                       "env": "env", "mounts": "mount", "name": "name"}


def _key_values(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _run_options(args: argparse.Namespace) -> dict:
    """The scheduler's run options given on the command line; unset ones fall back to .torchxconfig's."""
    if args.scheduler not in CLUSTER_SCHEDULERS:
        return {}
    options = {"queue": args.queue, "namespace": args.namespace, "service_account": args.service_account,
               "priority_class": args.priority_class, "tolerations": args.toleration or None,
               "node_selector": _key_values(args.node_selector, "--node-selector") or None,
               "image_pull_secrets": args.image_pull_secret or None, "credentials_secret": args.credentials_secret}
    return {key: value for key, value in options.items() if value is not None}


def submit_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.launch.submit import Submission

    arguments = {parameter: getattr(args, option) for parameter, option in COMPONENT_ARGUMENTS.items()}
    submission = Submission.prepare(args.spec, arguments, args.overrides, args.scheduler, _run_options(args),
                                    workspace=args.workspace)
    if args.dryrun:
        print(submission.describe(), end="")
        return 0
    handle = submission.create()
    print(handle, flush=True)
    if args.scheduler in CLUSTER_SCHEDULERS:
        return 0
    state = submission.follow(handle)
    print(f"{handle}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def logs_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from torchx.runner import get_runner

    from service.launch.submit import stream_logs

    stream_logs(get_runner(), args.handle)
    return 0


def cancel_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from torchx.runner import get_runner

    get_runner().cancel(args.handle)
    print(f"{args.handle}: cancelled")
    return 0
