"""Validate Kubernetes objects without a cluster, for tests of k8s/ and of the jobs the schedulers render.

- ``validate_custom``: an object of a custom resource this project uses (Volcano Job / Queue / PodGroup, JobSet,
  Kueue LocalQueue / ClusterQueue / ResourceFlavor / WorkloadPriorityClass) against its CRD's ``openAPIV3Schema``
  in ``shared/schemas/<project>/``, made strict (unknown fields are errors, where the API server would drop them);
  ``validate_volcano`` and ``validate_jobset`` are it, for one project's kinds.
- ``validate_core``: built-in kinds (Pod, Namespace, Role, ...) with ``kubernetes-validate``, strict.
- ``template_as_pod``: a PodTemplateSpec (a Volcano task's ``template``) as a Pod, for validate_core and checkov.
- ``checkov_failures``: checkov's security checks that fail on some manifests, minus justified skips.
  checkov runs from its own virtual environment (see ``checkov_executable``): installed into the project's
  venv it downgrades botocore below what aiobotocore (s3fs) requires.

Each validator raises ``AssertionError`` whose message names the object and the path of every error.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

SHARED_DIR_ENV = "BARLOW_SHARED_DIR"
CHECKOV_ENV = "BARLOW_CHECKOV"
TOOLS_DIR_ENV = "BARLOW_TOOLS_DIR"
CHECKOV_REQUIREMENT = "checkov>=3.2,<4"
# the CRD files of each folder under shared/schemas/, and the API groups they define
CRD_FILES = {
    "volcano": ("batch.volcano.sh_jobs.yaml", "scheduling.volcano.sh_queues.yaml",
                "scheduling.volcano.sh_podgroups.yaml"),
    "jobset": ("jobset.x-k8s.io_jobsets.yaml",),
    "kueue": ("kueue.x-k8s.io_localqueues.yaml", "kueue.x-k8s.io_clusterqueues.yaml",
              "kueue.x-k8s.io_resourceflavors.yaml", "kueue.x-k8s.io_workloadpriorityclasses.yaml"),
}
_CUSTOM_GROUP = re.compile(r"(^|\.)(volcano\.sh|jobset\.x-k8s\.io|kueue\.x-k8s\.io)$")
# API groups served by Kubernetes itself: kubernetes-validate maps "group.x/v1" to "group-v1", so a CRD's
# apiVersion (batch.volcano.sh/v1) would otherwise be checked against a built-in schema (batch/v1 Job).
_BUILTIN_GROUPS = {"", "apps", "batch", "autoscaling", "policy"}


def shared_dir() -> Path:
    """The shared folder beside the repository (CI clones it to ../shared), or $BARLOW_SHARED_DIR."""
    override = os.environ.get(SHARED_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared"


def _describe(obj: dict) -> str:
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = metadata.get("name") or metadata.get("generateName")
    return f"{obj.get('apiVersion')} {obj.get('kind')} {name!r}"


def _json_path(path: Iterable[Any]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return text.lstrip(".") or "<root>"


def _strict(schema: dict) -> dict:
    """A copy of the schema with additionalProperties: false on every object schema that lists properties
    and allows nothing else.

    The API server prunes unknown fields of a CRD silently; a test should see them as the typos they are.
    """
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            strict["additionalProperties"] = False
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(keyword), dict):
            strict[keyword] = _strict(schema[keyword])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in schema:
            strict[keyword] = [_strict(sub) for sub in schema[keyword]]
    return strict


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def _custom_crds(folder: Path) -> dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]]:
    """(apiVersion, kind) -> (scope, validator of the strict schema), for every version of each CRD."""
    crds = {}
    for project, names in CRD_FILES.items():
        for name in names:
            path = folder / project / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: clone the shared folder beside the repository "
                                        f"or point ${SHARED_DIR_ENV} at it")
            for crd in filter(None, yaml.safe_load_all(path.read_text())):
                spec = crd["spec"]
                for version in spec["versions"]:
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    # OpenAPI v3.0 schemas are JSON Schema draft 4 plus extensions (x-kubernetes-*), ignored here.
                    validator = jsonschema.Draft4Validator(schema, format_checker=_FORMATS)
                    crds[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = (spec["scope"], validator)
    return crds


def is_custom(obj: dict) -> bool:
    """Whether the object's API group is one of the custom resources above (batch.volcano.sh, jobset.x-k8s.io,
    kueue.x-k8s.io, ...)."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return bool(_CUSTOM_GROUP.search(group))


def validate_custom(obj: dict, project: str | None = None) -> None:
    """Validate a Volcano, JobSet or Kueue object against its CRD schema, rejecting unknown fields; `project`
    ("volcano", "jobset", "kueue") also requires the kind to be one of that project's.

    ``metadata`` is checked as a built-in object's metadata would be (the CRDs leave it open), and a
    cluster-scoped kind (Queue, ClusterQueue, ...) must not name a namespace.
    """
    crds = _custom_crds((shared_dir() / "schemas").resolve())
    key = (obj.get("apiVersion"), obj.get("kind"))
    group = str(key[0]).rpartition("/")[0]
    if key not in crds or (project and project not in group):
        known = ", ".join(f"{api} {kind}" for api, kind in sorted(crds) if not project or project in api)
        raise AssertionError(f"{_describe(obj)}: not a known {project or 'custom'} kind (known: {known})")
    scope, validator = crds[key]
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not (metadata.get("name") or metadata.get("generateName")):
        problems.append("metadata: needs a name (or generateName)")
    else:
        # a ConfigMap is the smallest built-in object with the same metadata schema
        problem = _core_problem({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, "1.30.0")
        if problem:
            problems.append(problem)
        if scope == "Cluster" and "namespace" in metadata:
            problems.append(f"metadata.namespace: {obj['kind']} is cluster-scoped and has no namespace")
    if problems:
        raise AssertionError(f"{_describe(obj)} does not match its CRD:\n  " + "\n  ".join(problems))


def _core_problem(obj: dict, k8s_version: str) -> str | None:
    """The first error kubernetes-validate finds in the object, as "path: message", or None."""
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{_json_path(error.absolute_path)}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return error.message
    return None


def validate_core(obj: dict, k8s_version: str = "1.30.0") -> None:
    """Validate a built-in Kubernetes object with kubernetes-validate's strict schemas (unknown fields fail).

    kubernetes-validate bundles 1.25 to 1.37; it does not check quantities ("2Gi") beyond int-or-string.
    """
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    if group not in _BUILTIN_GROUPS and not group.endswith(".k8s.io"):
        hint = " (use validate_custom)" if is_custom(obj) else ""
        raise AssertionError(f"{_describe(obj)}: not a built-in Kubernetes API group{hint}")
    problem = _core_problem(obj, k8s_version)
    if problem:
        raise AssertionError(f"{_describe(obj)} is invalid for Kubernetes {k8s_version}: {problem}")


def template_as_pod(template: dict, name: str = "pod-template") -> dict:
    """A PodTemplateSpec (``metadata`` + ``spec``) as a Pod; ``name`` is used where the template has none."""
    metadata = dict(template.get("metadata") or {})
    metadata.setdefault("name", name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": copy.deepcopy(template["spec"])}


def validate_volcano(obj: dict) -> None:
    validate_custom(obj, "volcano")


def validate_jobset(obj: dict) -> None:
    validate_custom(obj, "jobset")


def validate_manifest(obj: dict, k8s_version: str = "1.30.0") -> None:
    """``validate_custom`` for the custom resources' kinds, ``validate_core`` for everything else."""
    if is_custom(obj):
        validate_custom(obj)
    else:
        validate_core(obj, k8s_version)


def checkov_executable() -> Path:
    """checkov from $BARLOW_CHECKOV, or from a virtual environment of its own, created on first use.

    The environment lives in $BARLOW_TOOLS_DIR/checkov (default ~/.cache/barlow-tools/checkov), outside the
    repository; creating it takes about half a minute and needs the package index.
    """
    override = os.environ.get(CHECKOV_ENV)
    if override:
        return Path(override)
    tools = Path(os.environ.get(TOOLS_DIR_ENV) or Path.home() / ".cache" / "barlow-tools")
    venv = tools / "checkov"
    executable = venv / "bin" / "checkov"
    stamp = venv / "installed-requirement"
    if stamp.is_file() and stamp.read_text() == CHECKOV_REQUIREMENT and executable.is_file():
        return executable
    shutil.rmtree(venv, ignore_errors=True)
    tools.mkdir(parents=True, exist_ok=True)
    # run from the tools folder without PYTHONPATH: pip would take a project's *.egg-info in the cwd as installed
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tools, env=env)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    CHECKOV_REQUIREMENT], check=True, cwd=tools, env=env)
    stamp.write_text(CHECKOV_REQUIREMENT)
    return executable


def checkov_failures(manifests: list[dict], skip: dict[str, str]) -> list[str]:
    """Ids of checkov's kubernetes checks that fail on the manifests, sorted, minus the ``skip`` ones.

    ``skip`` maps a check id to why it does not apply; an empty justification is refused.
    Pod templates inside Volcano Jobs are not scanned by checkov: pass them through ``template_as_pod``.
    """
    unjustified = sorted(check for check, why in skip.items() if not why.strip())
    if unjustified:
        raise ValueError(f"skipped checkov checks need a justification: {unjustified}")
    with tempfile.TemporaryDirectory(prefix="checkov-") as folder:
        for number, manifest in enumerate(manifests):
            (Path(folder) / f"{number:03d}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        result = subprocess.run(
            [str(checkov_executable()), "--directory", folder, "--framework", "kubernetes", "--output", "json",
             "--skip-download", "--quiet"],
            # offline: no guideline download (--skip-download), no look-up of a newer checkov on PyPI
            capture_output=True, text=True, env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
        )
    # exit code 1 means "some checks failed"; anything else that is not 0 is checkov itself failing
    if result.returncode not in (0, 1):
        raise RuntimeError(f"checkov exited with {result.returncode}:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout)
    summary = report["summary"]
    if summary["parsing_errors"] or summary["resource_count"] != len(manifests):
        raise RuntimeError(f"checkov did not scan all {len(manifests)} manifests: {summary}")
    failed = {check["check_id"] for check in report.get("results", {}).get("failed_checks", [])}
    return sorted(failed - set(skip))
