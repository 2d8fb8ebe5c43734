"""`barlow status`, `barlow runs ls` and `barlow report`: what a run has done, read from its storage (stats.txt,
the lease, the checkpoints), whether its job still runs or not."""

from __future__ import annotations

import argparse

from service.cli.parser import storage_spec


def status_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.launch.status import print_status

    return print_status(args.target, storage_spec(args))


def runs_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.reports.progress import print_runs

    return print_runs(args.url, storage_spec(args))


def report_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.reports.report import write_report

    print(write_report(args.run, args.output, storage_spec(args)))
    return 0
