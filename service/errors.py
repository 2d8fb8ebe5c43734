"""What a user's input can cause, as one family: `barlow` prints a `UserError` as one line and exits 2; any other
exception is a defect of ours and keeps its traceback.

Each kind keeps the built-in base its callers catch (a SpecError is a ValueError, the rest RuntimeErrors). This
module is the bottom layer: it imports nothing of the project, and every layer may raise its errors.
"""

from __future__ import annotations

# `barlow`'s exit status for a UserError (argparse's for a bad command line too): the pods' main process passes it
# on (service/launch/torchrun.py), so that a cluster fails the job at once instead of retrying what no retry mends
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix: the message says what it is and what to do."""


class SpecError(UserError, ValueError):
    """A spec that cannot be used, with a message that says how to fix it."""


class StorageError(UserError, RuntimeError):
    """The run's storage cannot be used; the message names the URL and the likely cause."""


class DataError(UserError, RuntimeError):
    """The data set cannot be read as the spec says; the message says what to do."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class NonFiniteLoss(UserError, RuntimeError):
    """The loss or the gradients stopped being finite: the run stops without saving anything after that step."""


class JobError(UserError, RuntimeError):
    """A job that cannot be found or read through its scheduler (a handle of no job, an API that refuses)."""
