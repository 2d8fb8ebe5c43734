"""`barlow`'s entry point: parse the arguments, run the command's handler, and turn a user's mistake into one line.

A `UserError` (service.errors) is printed as `barlow: <message>` on standard error and exits 2, and so is a
storage exception of a command that reads a URL, explained with that URL. Anything else (a ValueError included)
is a defect of ours and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# each of these imports torch, TorchX and the training modules inside its handlers only: `barlow submit`,
# `validate` and `schema` start in a fraction of the time
from service.cli import checkpoints, data, jobs, runs, specs, training
from service.cli.parser import build_parser
from service.errors import USER_ERROR_EXIT, UserError
from service.observe.logs import configure_logging, record_user_error
from service.storage.filesystem import explain, storage_errors

# a command's handler gets the parsed arguments and the argv given to main (None: sys.argv), which the run records
Handler = Callable[[argparse.Namespace, list[str] | None], int]

COMMANDS: dict[str, Handler] = {
    "train": training.train_command,
    "evaluate": training.evaluate_command,
    "compare": training.compare_command,
    "validate": specs.validate_command,
    "schema": specs.schema_command,
    "checkpoints": checkpoints.checkpoints_command,
    "export": checkpoints.export_command,
    "data": data.data_command,
    "submit": jobs.submit_command,
    "logs": jobs.logs_command,
    "cancel": jobs.cancel_command,
    "status": runs.status_command,
    "runs": runs.runs_command,
    "report": runs.report_command,
}

# the argument holding the URL a command reads, named in a storage error's message
URL_ARGUMENTS = {"checkpoints": "run", "export": "source", "report": "run", "runs": "url", "status": "target"}


def _url_argument(args: argparse.Namespace) -> str | None:
    if args.command == "data":
        return "url" if args.action == "ls" else "dest"
    return URL_ARGUMENTS.get(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return COMMANDS[args.command](args, argv)
    except UserError as error:
        print(f"barlow: {error}", file=sys.stderr)
        record_user_error(f"barlow: {error}")
        return USER_ERROR_EXIT
    except storage_errors() as error:  # reading a run or a checkpoint: bad credentials, endpoint, bucket
        where = _url_argument(args)
        if where is None:  # the other commands explain their storage errors themselves: one here is a defect
            raise
        print(f"barlow: {explain(getattr(args, where), error)}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
