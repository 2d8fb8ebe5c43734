"""The image's inputs, checked without building it: one source of truth for dependencies, what the Dockerfile
copies and the workspace carries. hadolint on the Dockerfile: tests/integration/test_image_files.py."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def test_every_runtime_dependency_is_locked_within_its_range():
    pins = locked()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in constraints.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}: run make lock")


def test_the_lock_is_closed_under_the_dependencies_it_pins():
    """Each locked package's own requirements are locked too (pip check in the image build proves the same)."""
    pins = locked()
    for name in pins:
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in pins, f"{name} needs {requirement}, which constraints.txt does not pin"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), (name, requirement)


def test_the_tests_run_the_versions_the_image_ships():
    for name, version in locked().items():
        assert metadata.version(name) == version, f"{name}: .venv has {metadata.version(name)}, the lock {version}"


def test_dockerignore_admits_what_the_dockerfile_copies():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = {source for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
              for source in line.split()[1:-1]}
    admitted = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")}
    assert copied <= admitted, copied - admitted
    uid = re.search(r"useradd --uid (\d+)", dockerfile).group(1)
    from service.launch.pods import RUN_AS_USER

    assert int(uid) == RUN_AS_USER, "the pod's runAsUser must be the image's user"


def test_a_torchx_workspace_carries_the_code_the_pods_run():
    """`torchx run --workspace .` copies what .dockerignore admits, read by torchx's own walker (not Docker's)."""
    import fsspec
    from torchx.workspace.api import walk_workspace

    copied = {str(Path(folder, name).relative_to(ROOT)) for folder, _, files in
              walk_workspace(fsspec.filesystem("file"), str(ROOT), ".dockerignore") for name in files}
    assert {"service/__init__.py", "service/launch/pods.py", "components/barlowtwins.py",
            "specs/digits.yaml"} <= copied
    assert not any("__pycache__" in path or path.startswith(("tests/", ".git/", ".venv/")) for path in copied)
