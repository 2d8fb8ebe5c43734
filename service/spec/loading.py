"""Reading a spec: from a file, an fsspec URL or a job's environment, with dotted overrides, validated into a
TrainSpec or an EvaluateSpec, and its problems described one line each.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, overload

import yaml
from pydantic import BaseModel, ValidationError

from service.credentials import redact_value
from service.errors import SpecError, StorageError
from service.spec.bounded_yaml import MAX_SPEC_BYTES, safe_yaml
from service.spec.evaluate import EvaluateSpec
from service.spec.sections import StorageSpec
from service.spec.train import TrainSpec
from service.storage.filesystem import explain, filesystem, storage_errors


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `dotted.key=value` applied; values are parsed as YAML."""
    result = json.loads(json.dumps(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise SpecError(f"override {override!r} is not of the form section.field=value")
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[leaf] = safe_yaml(raw, f"override {key}")
    return result


@overload
def load_spec(path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None,
              kind: type[TrainSpec] | None = None) -> TrainSpec: ...
@overload
def load_spec(path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None, *,
              kind: type[EvaluateSpec]) -> EvaluateSpec: ...
@overload
def load_spec(path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None,
              kind: type[TrainSpec] | type[EvaluateSpec] | None = None) -> TrainSpec | EvaluateSpec: ...
def load_spec(path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None,
              kind: type[TrainSpec] | type[EvaluateSpec] | None = None) -> TrainSpec | EvaluateSpec:
    """Read a YAML spec (or the defaults when `path` is None), apply overrides, validate as `kind` (TrainSpec).

    `path` is a file, an fsspec URL (s3://bucket/specs/x.yaml, read with the overrides' storage.* settings), or
    env:NAME, a spec shipped in an environment variable (how a submitted job carries its resolved spec)."""
    data = read_spec_data(str(path), overrides) if path is not None else {}
    return validate_spec(data, overrides, world_size=world_size, kind=kind or TrainSpec, source=str(path or "the spec"))


def validate_spec(data: dict[str, Any], overrides: Sequence[str] = (), *, world_size: int | None = None,
                  kind: type[TrainSpec] | type[EvaluateSpec], source: str) -> TrainSpec | EvaluateSpec:
    """A spec's sections as read (`read_spec_data`), with the overrides applied, validated as `kind` for
    `world_size` workers; SpecError naming `source` and every problem otherwise."""
    try:
        return kind.model_validate(apply_overrides(data, list(overrides)), context={"world_size": world_size})
    except ValidationError as error:
        raise SpecError(describe_errors(error, source=source, root=kind)) from None


def read_spec_data(source: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping of sections a spec source holds (a file, a URL or env:NAME; see load_spec)."""
    data = safe_yaml(read_spec_text(source, overrides), f"spec {source}") or {}
    if not isinstance(data, dict):
        raise SpecError(f"spec {source} must hold a mapping of sections (data, model, optim, ...)")
    return data


SPEC_ENV_PREFIX = "env:"


def spec_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# Within `reading_each_spec_once()`, the text of every spec source read so far, by source and storage overrides
_REMEMBERED: ContextVar[dict[tuple[str, tuple[str, ...]], str] | None] = ContextVar("remembered_specs", default=None)


@contextlib.contextmanager
def reading_each_spec_once() -> Iterator[None]:
    """Each spec source is read once within this block: a submission chooses its component by the spec's kind and
    the component then validates the same text (one GET of an S3 spec, and both see the same version of it)."""
    token = _REMEMBERED.set({})
    try:
        yield
    finally:
        _REMEMBERED.reset(token)


def read_spec_text(source: str, overrides: Sequence[str] = ()) -> str:
    """A spec's text from a file, an fsspec URL or env:NAME (see reading_each_spec_once)."""
    remembered = _REMEMBERED.get()
    if remembered is None:
        return _read_spec_text(source, overrides)
    key = (source, tuple(o for o in overrides if o.partition("=")[0].startswith("storage.")))
    if key not in remembered:
        remembered[key] = _read_spec_text(source, overrides)
    return remembered[key]


def _read_spec_text(source: str, overrides: Sequence[str]) -> str:
    """A shipped spec (env:NAME) is checked against NAME_SHA256 when that is set: the pods run what was validated
    at submission, or nothing."""
    if source.startswith(SPEC_ENV_PREFIX):
        name = source.removeprefix(SPEC_ENV_PREFIX)
        if name not in os.environ:
            raise SpecError(f"spec {source}: the environment variable {name} is not set")
        text = os.environ[name]
        digest = os.environ.get(f"{name}_SHA256")
        if digest is not None and spec_digest(text) != digest:
            raise SpecError(f"spec {source} does not match {name}_SHA256: it changed after it was validated")
        return text
    if "://" in source and not source.startswith("file://"):
        return _read_spec_url(source, overrides)
    return _read_spec_file(source.removeprefix("file://")).decode("utf-8", errors="replace")


def _read_spec_url(url: str, overrides: Sequence[str]) -> str:
    settings = apply_overrides({}, [o for o in overrides if o.partition("=")[0].startswith("storage.")])
    try:
        storage = StorageSpec.model_validate(settings.get("storage", {}))
    except ValidationError as error:
        raise SpecError(describe_errors(error, source="the storage.* overrides", root=TrainSpec)) from None
    try:
        fs, path = filesystem(url, storage)
        if fs.isdir(path):
            raise SpecError(f"spec {url} is a folder: give a YAML file, e.g. s3://bucket/specs/x.yaml")
        with fs.open(path, "rb") as file:
            text = file.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec {url} does not exist") from None
    except StorageError as error:
        raise SpecError(f"spec {error}") from None
    except storage_errors() as error:
        raise SpecError(f"spec {explain(url, error)}") from None
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec {url} is larger than {MAX_SPEC_BYTES // 2**20} MiB: a spec is a few KB")
    return text.decode("utf-8", errors="replace")




def _read_spec_file(path: str | Path) -> bytes:
    """A spec file's bytes: a regular file (a folder, FIFO or device is refused, never opened) of at most
    MAX_SPEC_BYTES."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise SpecError(f"spec file {path} is {what}: give a YAML file, e.g. specs/digits.yaml")
        # non-blocking: should the path have become a FIFO since, reading it cannot hang
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
            text = file.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except OSError as error:
        raise SpecError(f"spec file {path} cannot be read: {error.strerror or error}") from None
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file {path} is larger than {MAX_SPEC_BYTES // 2**20} MiB: a spec is a few KB")
    return text


def spec_kind(path: str | Path, overrides: Sequence[str] = ()) -> type[TrainSpec] | type[EvaluateSpec]:
    """EvaluateSpec for a spec with an `eval` or `backbone` section, TrainSpec otherwise."""
    try:
        data = read_spec_data(str(path), overrides)
    except SpecError:
        return TrainSpec  # load_spec reports the problem
    return kind_of(data)


def kind_of(data: dict[str, Any]) -> type[TrainSpec] | type[EvaluateSpec]:
    return EvaluateSpec if {"eval", "backbone"} & set(data) else TrainSpec


def describe_errors(error: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem, named by its dotted field path, with a suggestion for misspelt fields."""
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for problem in error.errors():
        subpath = problem.get("ctx", {}).get("subpath")  # where a credential lies inside storage.options
        where = ".".join(str(part) for part in problem["loc"]) + (f".{subpath}" if subpath else "") or "spec"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field" + _did_you_mean(problem["loc"], root or TrainSpec)
        elif "input" in problem and problem["type"] not in ("missing", "value_error", "credential"):
            message += f" (got {redact_value(problem['input'])!r})"  # never a credential's value
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _did_you_mean(location: tuple[Any, ...], model: type[BaseModel]) -> str:
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(model.model_fields)}"


def spec_to_yaml(spec: BaseModel) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def json_schema(kind: type[BaseModel] | None = None) -> dict[str, Any]:
    return (kind or TrainSpec).model_json_schema()
