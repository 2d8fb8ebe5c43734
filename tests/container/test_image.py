"""The training image, built from docker/Dockerfile and run for real (Docker, or podman where no daemon runs).

The scenario users depend on after a node is lost: a container trains on digits as the image's non-root user with
a read-only root filesystem and checkpoints to the S3 test server on the host; SIGTERM (what Kubernetes sends
before it kills a pod) makes it write a final checkpoint and exit 0; a new container with the same spec, now
under torchrun as TorchX launches it, resumes from that S3 checkpoint and finishes; the backbone it exports loads
here, outside any container, and equals the backbone of its last checkpoint.
"""

from __future__ import annotations

import json
import time
import uuid

import torch

from service.checkpoint.catalog import list_checkpoints
from service.checkpoint.export import export_checkpoint
from service.method.model import build_backbone
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.container_engine import IMAGE, engine
from tests.support.runs import TINY, TINY_STEPS_PER_EPOCH, resumed_step
from tests.support.s3_server import TEST_CREDENTIALS

# The tiny recipe over 3 epochs: 48 steps of 64 digits, a checkpoint every 4 steps, SIGTERM after the first.
TOTAL_STEPS = 3 * TINY_STEPS_PER_EPOCH
SETTINGS = [*TINY, "optim.epochs=3"]


def container_command(name: str, run_url: str, endpoint: str, *command: str, detach: bool = False) -> list[str]:
    """`run` as Kubernetes runs the pod (barlow submit): non-root, read-only root filesystem, writable /tmp."""
    credentials = [arg for key, value in TEST_CREDENTIALS.items() for arg in ("-e", f"{key}={value}")]
    overrides = [arg for setting in [*SETTINGS, f"run.output={run_url}", f"storage.endpoint_url={endpoint}"]
                 for arg in ("--set", setting)]
    return ["run", *(["-d"] if detach else ["--rm"]), "--name", name, "--network=host", "--read-only",
            "--tmpfs", "/tmp", "-e", "OMP_NUM_THREADS=1", *credentials, IMAGE, *command, *overrides]


def wait_for_checkpoint(run_url: str, storage: StorageSpec, name: str) -> int:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        valid = [c.step for c in list_checkpoints(run_url, storage) if c.valid]
        if valid:
            return valid[-1]
        state = engine("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        assert state == "true", "the container stopped before its first checkpoint:\n" + engine("logs", name).stderr
        time.sleep(0.5)
    raise AssertionError("no checkpoint appeared")


def test_image_metadata_user_and_contents(image):
    inspect = json.loads(engine("image", "inspect", image).stdout)[0]
    config = inspect.get("Config") or inspect.get("config")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "barlowtwins-service"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert config["User"] == "1000:1000"
    probe = ("id -u; id -g; ls -A /root/.cache /home/barlow/.cache 2>/dev/null"
             "| wc -l; python -c 'import service, torch, torchvision, torchx, s3fs; print(torch.__version__)'")
    lines = engine("run", "--rm", "--entrypoint", "/bin/sh", image, "-c", probe).stdout.split()
    uid, gid, caches, torch_version = lines
    assert (uid, gid) == ("1000", "1000")
    assert caches == "0"
    assert torch_version.startswith("2.14.") and "+cpu" not in torch_version  # the CUDA build, as on PyPI
    help_text = engine("run", "--rm", image).stdout  # the default command
    assert "train" in help_text and "submit" in help_text


def test_torch_compile_builds_its_kernels_in_the_read_only_container(image):
    """run.compile needs a C++ compiler and the Python headers at run time (Inductor on the CPU, Triton's launcher
    on GPUs), and a writable cache: /tmp, the pods' emptyDir."""
    script = ("import torch; f = torch.compile(lambda x: torch.sin(x) * 2 + 1); x = torch.linspace(0, 1, 7); "
              "print(torch.allclose(f(x), torch.sin(x) * 2 + 1), "
              "torch._dynamo.utils.counters['stats']['unique_graphs'])")
    result = engine("run", "--rm", "--read-only", "--tmpfs", "/tmp", image, "python", "-c", script)
    assert result.stdout.split() == ["True", "1"], result.stdout + result.stderr[-3000:]


def test_sigterm_checkpoints_then_a_new_container_resumes_from_s3(image, s3_server, s3_bucket, tmp_path):
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    run_url = f"{s3_bucket}/run"
    first, second = f"barlow-test-{uuid.uuid4().hex[:8]}", f"barlow-test-{uuid.uuid4().hex[:8]}"
    try:
        engine(*container_command(first, run_url, s3_server.endpoint_url, "barlow", "train", "specs/digits.yaml",
                                  detach=True))
        wait_for_checkpoint(run_url, storage, first)
        engine("kill", "--signal", "TERM", first)
        exit_code = engine("wait", first, timeout=300).stdout.strip()
        logs = engine("logs", first)
        output = logs.stdout + logs.stderr
        assert exit_code == "0", output[-4000:]
        assert "stopped by SIGTERM after" in output, output[-4000:]
        stopped_at = int(output.split("stopped by SIGTERM after ")[1].split()[0])
        assert stopped_at in [c.step for c in list_checkpoints(run_url, storage) if c.valid]
        assert stopped_at < TOTAL_STEPS, "SIGTERM came too late to test a resume"

        resumed = engine(*container_command(second, run_url, s3_server.endpoint_url, "torchrun", "--standalone",
                                            "--nproc-per-node", "2", "-m", "service", "train", "specs/digits.yaml"))
        output = resumed.stdout + resumed.stderr
        assert resumed_step(output) == stopped_at, output[-4000:]  # the SIGTERM checkpoint, not an earlier one
        assert f"done: {TOTAL_STEPS} steps" in output, output[-4000:]
    finally:
        for name in (first, second):
            engine("rm", "-f", name, check=False)

    fs, path = filesystem(run_url, storage)
    with fs.open(f"{path}/resnet18.pth", "rb") as file:
        exported = torch.load(file, weights_only=True)
    backbone = build_backbone("resnet18", stem="cifar")
    backbone.fc = torch.nn.Identity()
    backbone.load_state_dict(exported)  # strict: every key, every shape
    last = [c for c in list_checkpoints(run_url, storage) if c.valid][-1]
    assert last.step == TOTAL_STEPS
    from_checkpoint = export_checkpoint(last.url, str(tmp_path / "from-checkpoint.pth"), storage)
    assert exported.keys() == from_checkpoint.keys()
    for key, value in exported.items():
        assert torch.equal(value, from_checkpoint[key]), key
