"""The resume policy: which checkpoints a run may continue from, and whether a chosen one fits this run.

`checkpoint.resume`: `auto` tries the valid checkpoints under run.output, newest first (the manager falls back past
corrupt ones); `none` starts fresh and is refused where run.output holds checkpoints; a checkpoint URL tries that one
only, refused where run.output holds newer ones the run would collide with. A candidate is refused when another run
wrote it (the lineage the lease recorded), when the recipe changed in a field `checkpoint.allow_changes` does not
name (service/spec/recipe.py), or when its steps per epoch differ from this run's.
"""

from __future__ import annotations

import logging
from typing import Any

from service.checkpoint.catalog import CheckpointInfo, inspect_checkpoint
from service.errors import CheckpointError
from service.spec import CheckpointSpec, StorageSpec, recipe

log = logging.getLogger("barlow")


def candidates(spec: CheckpointSpec, checkpoints: list[CheckpointInfo], storage: StorageSpec, root: str
               ) -> list[CheckpointInfo]:
    """The checkpoints to try, oldest first (the newest is tried first); [] starts fresh. `checkpoints`: every one
    under `root` (run.output/checkpoints). CheckpointError where the policy refuses to start."""
    if spec.resume == "none":
        if checkpoints:
            raise CheckpointError(
                f"{root} already holds checkpoints and checkpoint.resume=none: choose another run.output, "
                "delete them, or resume with checkpoint.resume=auto"
            )
        return []
    if spec.resume == "auto":
        for checkpoint in checkpoints:
            if not checkpoint.valid:
                log.warning("ignoring %s: %s", checkpoint.url, checkpoint.problem)
        return [c for c in checkpoints if c.valid]
    chosen = inspect_checkpoint(spec.resume, storage)
    if not chosen.valid:
        raise CheckpointError(f"checkpoint.resume={spec.resume} cannot be used: {chosen.problem}")
    newer = [c.url for c in checkpoints if c.valid and c.step > chosen.step]
    if newer:
        raise CheckpointError(
            f"run.output already holds newer checkpoints ({newer[-1]}) that this run would collide with: "
            "resume into another run.output"
        )
    return [chosen]


def check_resumable(checkpoint: CheckpointInfo, *, spec: CheckpointSpec, resolved_spec: dict[str, Any],
                    steps_per_epoch: int, run_url: str, lineage: str | None) -> None:
    """Refuse (CheckpointError) a checkpoint of another run, of another recipe, or of another number of steps per
    epoch. `lineage`: the run id the run's lease named before this job took it (None: unknown)."""
    assert checkpoint.manifest is not None  # only valid checkpoints are checked
    if spec.resume == "auto" and lineage and checkpoint.run_id and checkpoint.run_id != lineage:
        raise CheckpointError(
            f"{checkpoint.url} was written by run {checkpoint.run_id}, but {run_url} belongs to run "
            f"{lineage} (its lease): resume it on purpose with checkpoint.resume={checkpoint.url}, or remove it"
        )
    refused = recipe.refused_changes(checkpoint.manifest["spec"], resolved_spec, spec.allow_changes)
    if refused:
        raise CheckpointError(
            f"{checkpoint.url} was trained with another recipe: {recipe.describe(refused)}. Resume with the "
            "checkpoint's values, name the fields in checkpoint.allow_changes to change them on purpose (e.g. "
            f"--set 'checkpoint.allow_changes=[{', '.join(refused)}]'), or start a new run.output"
        )
    if checkpoint.manifest["steps_per_epoch"] != steps_per_epoch:
        raise CheckpointError(
            f"{checkpoint.url} was made with {checkpoint.manifest['steps_per_epoch']} steps per epoch, this run "
            f"has {steps_per_epoch}: keep optim.batch_size and the data set of the run to resume it"
        )
