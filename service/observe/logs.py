"""The service's log lines on standard error: text for a terminal, one JSON object per line for a log collector.

A JSON line carries the time (ISO-8601, UTC, milliseconds), the level, the worker's rank, the training step the
worker is at (null before training starts) and the message, plus `exc` with the traceback when there is one:

    {"time": "2025-01-31T09:12:03.417Z", "level": "INFO", "rank": 0, "step": 12, "message": "epoch 1 step 12/240 ..."}

The trainer calls `set_step` every step. The error file that torchrun reads (`record_user_error`) is here too: it is
what the launcher, rather than the log, shows of a worker that stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

LOGGER = "barlow"

_step: int | None = None


def set_step(step: int | None) -> None:
    """The training step the following log lines belong to (None: not training). Cheap enough for every step."""
    global _step
    _step = step


def _rank() -> int:
    """This worker's global rank under torchrun; a process on its own is rank 0."""
    return int(os.environ.get("RANK", "0"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time, level, rank, step, message, and exc when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = _rank()

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "rank": self.rank,
            "step": _step,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def text_formatter() -> logging.Formatter:
    """`HH:MM:SS message`, with `[rank N]` after the time under torchrun."""
    prefix = f"[rank {_rank()}] " if "RANK" in os.environ else ""
    return logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def chosen_format(log_format: str) -> str:
    """`text` or `json`: `auto` is json in a pod (KUBERNETES_SERVICE_HOST set) when standard error is no terminal."""
    if log_format == "auto":
        in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
        return "json" if in_pod and not sys.stderr.isatty() else "text"
    if log_format not in ("text", "json"):
        raise ValueError(f"log format {log_format!r}: choose auto, text or json")
    return log_format


class _Handler(logging.StreamHandler):
    """The handler configure_logging owns, so that configuring again replaces it instead of adding another."""


def configure_logging(log_format: str = "auto") -> None:
    """The service's own log lines only (rank 0 at INFO, the other workers at WARNING), not the libraries'.

    Call it again, e.g. once the spec says which format, to replace the previous setting; it writes to the
    standard error of the time of the call.
    """
    logger = logging.getLogger(LOGGER)
    for handler in [handler for handler in logger.handlers if isinstance(handler, _Handler)]:
        logger.removeHandler(handler)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen_format(log_format) == "json" else text_formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if _rank() == 0 else logging.WARNING)
    logger.propagate = False


def record_user_error(message: str) -> None:
    """Put the message of an error the user can fix, as printed, in torchrun's error file for this worker.

    torchrun sets TORCHELASTIC_ERROR_FILE for each worker it starts and, when the worker fails, prints the file's
    py_callstack as the root cause and hands the file up to TorchX's status. Torch's ErrorHandler would store a
    traceback there; a user's error is its message, so this writes the same format with the message in its place.
    Nothing happens outside torchrun.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    error = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                           "timestamp": str(int(time.time()))}}}
    with open(path, "w") as file:
        json.dump(error, file)
