"""What a training spec and an evaluation spec share: their checks across sections."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from pydantic import model_validator

from service.spec.recipe import flatten, unknown_names
from service.spec.sections import Section

if TYPE_CHECKING:  # declared by each kind of spec, in its own order (the order spec.yaml is written in)
    from service.spec.evaluate import EvalDataSpec
    from service.spec.sections import CheckpointSpec, DataSpec


class JobSpec(Section):
    """The base of TrainSpec and EvaluateSpec: each has a `data` section with `dataset` and `path`, and a
    `checkpoint` section."""

    if TYPE_CHECKING:
        data: DataSpec | EvalDataSpec
        checkpoint: CheckpointSpec

    @model_validator(mode="after")
    def _across_sections(self) -> JobSpec:
        self.check_allowed_changes()
        self.check_data_path()
        return self

    def check_allowed_changes(self) -> None:
        """Every entry of checkpoint.allow_changes names a field or a section of the spec (a typo would allow
        nothing)."""
        values = self.model_dump(mode="json")
        unknown = unknown_names(self.checkpoint.allow_changes, values)
        if unknown:
            names = list(flatten(values)) + list(values)
            hints = [difflib.get_close_matches(name, names, n=1) for name in unknown]
            raise ValueError("checkpoint.allow_changes names " + ", ".join(
                f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for name, hint in zip(unknown, hints))
                + ": not a field or section of the spec; write dotted names, e.g. optim.epochs or optim")

    def check_data_path(self) -> None:
        """Every data set but the built-in digits is read from `data.path`."""
        if self.data.dataset != "digits" and not self.data.path:
            raise ValueError(f"data.path is required for data.dataset={self.data.dataset!r}: set it to the data set's "
                             "root folder")
