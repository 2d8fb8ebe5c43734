"""The run folder: every name under `run.output`, in one place.

    RUN/spec.yaml                       the resolved spec, written when the run starts (and by every later attempt)
    RUN/stats.txt                       the reference's log: a command line, then one JSON object per line
    RUN/lease.json                      who owns the run now (service/run/lease.py)
    RUN/checkpoints/step-000000123/     one checkpoint, committed by its manifest.json (service/checkpoint/)
    RUN/tensorboard/                    event files (pretraining)
    RUN/<backbone>.pth                  the exported backbone (pretraining, at its end)
    RUN/results.json                    an evaluation's numbers
    RUN/classifier.pth                  an evaluation's backbone with its trained fc (linear, finetune)

Writers and readers both name files through here, so a reader never guesses what a writer spelt.
"""

from __future__ import annotations

import re

from service.spec import EvaluateSpec, StorageSpec, TrainSpec, spec_to_yaml
from service.storage.filesystem import write_bytes

SPEC = "spec.yaml"
STATS = "stats.txt"
LEASE = "lease.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
RESULTS = "results.json"
CLASSIFIER = "classifier.pth"  # an evaluation's backbone with its trained fc
CHECKPOINT_NAME = re.compile(r"step-([0-9]{9})")


def under(run_url: str, *names: str) -> str:
    """`run_url`/name/...: a file or folder of the run."""
    return "/".join([run_url.rstrip("/"), *names])


def checkpoints_url(run_url: str) -> str:
    return under(run_url, CHECKPOINTS)


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_url(run_url: str, step: int) -> str:
    return under(run_url, CHECKPOINTS, checkpoint_name(step))


def checkpoint_step(url: str) -> int | None:
    """The step of a checkpoint prefix named step-NNNNNNNNN, None for any other name (step-8.bak, tmp, ...)."""
    match = CHECKPOINT_NAME.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def weights_name(backbone: str) -> str:
    """The exported backbone's file name, as the reference's `resnet50.pth`."""
    return f"{backbone}.pth"


def write_spec(run_url: str, storage: StorageSpec, spec: TrainSpec | EvaluateSpec) -> str:
    """Write the resolved spec to RUN/spec.yaml, replacing an earlier attempt's; returns its URL. A storage failure
    is a StorageError naming the URL."""
    url = under(run_url, SPEC)
    write_bytes(url, storage, spec_to_yaml(spec).encode())
    return url
