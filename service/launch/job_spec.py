"""The spec a job carries: read, overridden and validated where the job is submitted, shipped inside the job.

A job's pods must run exactly the spec that was validated, wherever the user keeps it: a file on the submitting
machine, or a URL (s3://bucket/specs/x.yaml). The resolved spec (every default filled in, the overrides applied)
travels in the AppDef as the environment variable BARLOW_SPEC with its SHA-256 beside it; the pods read
`env:BARLOW_SPEC`, refuse it if it no longer matches, and write it to run.output/spec.yaml as every run does.
A spec that exists only inside the image stays possible as `image:PATH`: the pods read that path, and the
submitting machine validates its copy at the same relative path when it has one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from service.errors import SpecError
from service.spec import (
    SPEC_ENV_PREFIX,
    EvaluateSpec,
    TrainSpec,
    kind_of,
    read_spec_data,
    spec_digest,
    spec_to_yaml,
    validate_spec,
)

SPEC_ENV = "BARLOW_SPEC"
IMAGE_PREFIX = "image:"


@dataclass(frozen=True)
class JobSpec:
    argument: str  # the spec argument of the pods' `barlow train|evaluate`
    overrides: list[str]  # the --set arguments the pods get (only for an image: spec; a shipped one has them applied)
    env: dict[str, str] = field(default_factory=dict)  # BARLOW_SPEC and its digest, when it was resolved here
    run_output: str | None = None


def resolve_job_spec(spec: str, overrides: list[str], world_size: int, kind: type[TrainSpec] | type[EvaluateSpec]
                     ) -> JobSpec:
    """Validate `spec` with `overrides` for `world_size` workers (the job's largest) as `kind`; SpecError if not."""
    if spec.startswith(SPEC_ENV_PREFIX):
        raise SpecError(f"spec {spec}: a job's spec is a file, a URL or image:PATH; env: is how the job carries it")
    if spec.startswith(IMAGE_PREFIX):
        path = spec.removeprefix(IMAGE_PREFIX)
        if not path:
            raise SpecError("spec image: needs the spec's path inside the image, e.g. image:specs/imagenet-1000ep.yaml")
        local = path if os.path.isfile(path) else None
        run_output = None
        if local:  # the image's specs/ are this tree's: check the same file here
            run_output = _validated(local, overrides, world_size, kind).run.output
        return JobSpec(argument=path, overrides=list(overrides), run_output=run_output or _override("run.output",
                                                                                                    overrides))
    resolved = _validated(spec, overrides, world_size, kind)
    text = spec_to_yaml(resolved)
    return JobSpec(argument=SPEC_ENV_PREFIX + SPEC_ENV, overrides=[], run_output=resolved.run.output,
                   env={SPEC_ENV: text, f"{SPEC_ENV}_SHA256": spec_digest(text)})


def _validated(spec: str, overrides: list[str], world_size: int, kind: type[TrainSpec] | type[EvaluateSpec]
               ) -> TrainSpec | EvaluateSpec:
    data = read_spec_data(spec, overrides)  # the one read: the kind and the validation see the same text
    found = kind_of(data)
    if found is not kind:
        component, what = ("evaluate", "an evaluation") if found is EvaluateSpec else ("train", "a training")
        raise SpecError(f"spec {spec} is {what} spec (it {'has' if found is EvaluateSpec else 'lacks'} an eval or "
                        f"backbone section): launch it with the {component} component (barlowtwins.{component})")
    return validate_spec(data, overrides, world_size=world_size, kind=kind, source=spec)


def _override(key: str, overrides: list[str]) -> str | None:
    values = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == key]
    return values[-1] if values else None
