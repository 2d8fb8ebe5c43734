"""`torchx run -s kubernetes --workspace .`: TorchX layers the working tree over the training image, pushes the
result to image_repo and puts it in the job; the pushed image, pulled back from the registry, runs the changed
code.

Real parts: the `torchx` executable, podman's Docker-compatible API (`podman system service`, what TorchX's
docker-py client talks to) and a local image registry (Debian's `docker-registry`, on loopback). There is no
cluster, so the job's creation fails after the push, with one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.container_engine import ENGINE, IMAGE, ROOT, engine
from tests.support.s3_server import free_port

TORCHX = str(Path(sys.executable).parent / "torchx")
WORKSPACE_FILES = ["service", "components", "specs", "pyproject.toml", "README.md", "constraints.txt",
                   ".dockerignore", ".torchxconfig"]


def wait_until(ready, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry on 127.0.0.1, storing in a temporary folder."""
    executable = shutil.which("docker-registry")
    if executable is None:
        pytest.skip("NO IMAGE REGISTRY: docker-registry is missing (make container-tools installs it); the "
                    "workspace image was not pushed")
    folder = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    config = folder / "config.yml"
    config.write_text(json.dumps({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(folder / "data")}},
                                  "http": {"addr": address}, "log": {"level": "error"}}))
    process = subprocess.Popen([executable, "serve", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"http://{address}/v2/", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(answers, "docker-registry")
        yield address
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def docker_api(image, registry, tmp_path_factory):
    """podman's Docker API on a unix socket; it may push to the registry over plain HTTP (loopback only)."""
    folder = tmp_path_factory.mktemp("podman-service")
    registries = folder / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    socket = folder / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "podman.conf"),
           "CONTAINERS_REGISTRIES_CONF": str(registries)}
    process = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(socket.exists, "podman system service")
        yield f"unix://{socket}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_workspace_is_built_over_the_image_pushed_and_runs(docker_api, registry, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for name in WORKSPACE_FILES:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, workspace / name)
    marker = f"workspace-{uuid.uuid4().hex[:8]}"
    with open(workspace / "service" / "__init__.py", "a") as file:
        file.write(f"WORKSPACE_CHANGE = {marker!r}\n")
    repository = f"{registry}/barlow/trainer"

    result = subprocess.run(
        [TORCHX, "run", "-s", "kubernetes", "--workspace", ".", "-cfg", f"image_repo={repository},quiet=true",
         "barlowtwins.train", "--spec", "specs/digits.yaml", "--image", f"localhost/{IMAGE}",
         "run.output=s3://bucket/runs/workspace"],
        cwd=workspace, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "DOCKER_HOST": docker_api, "KUBECONFIG": "/nonexistent"})
    # no cluster here: the job is refused after the push, in one line
    assert result.returncode == 1 and "the job was not created" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    tags = json.load(urllib.request.urlopen(f"http://{registry}/v2/barlow/trainer/tags/list", timeout=10))["tags"]
    (tag,) = tags
    pushed = f"{repository}:{tag}"

    # the registry's copy, not this machine's: drop the local one, pull, run the code the pods would run
    engine("rmi", "-f", pushed, check=False)
    engine("pull", "--tls-verify=false", pushed, timeout=1800)
    try:
        probe = engine("run", "--rm", "--read-only", "--entrypoint", "python", pushed, "-c",
                       "import service; print(service.__file__, service.WORKSPACE_CHANGE)")
        assert probe.stdout.split() == ["/app/service/__init__.py", marker], probe.stdout + probe.stderr
        # the training image's own code is untouched: only the working tree was layered over it
        original = subprocess.run([ENGINE, "run", "--rm", "--entrypoint", "python", f"localhost/{IMAGE}", "-c",
                                   "import service; print(hasattr(service, 'WORKSPACE_CHANGE'))"],
                                  capture_output=True, text=True)
        assert original.stdout.split() == ["False"], original.stderr
    finally:
        engine("rmi", "-f", pushed, check=False)
