"""What the `barlow` executable says when storage or data cannot be used: one `barlow: URL: cause` line on
standard error, exit status 2, no traceback, no secret, and nothing created on the way (no bucket).

Every case runs the real executable in a subprocess, against moto S3 servers started by the tests, with the test
credentials (or none) in its environment and nothing from this machine's AWS configuration.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import PIL.Image
import pytest

from service.data.datasets import Cifar10, ImageFolder
from service.data.errors import DataError
from tests.support.s3_server import TEST_CREDENTIALS, S3Server, free_port
from tests.test_checkpoint import Training

ROOT = Path(__file__).resolve().parents[1]
BARLOW = Path(sys.executable).parent / "barlow"
SECRET = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
MISSING_BUCKET = "the bucket or folder does not exist: create it, or fix the URL"
CAUSES = {"rejected credentials": "access denied", "no credentials": "no credentials found",
          "unreachable": "cannot reach the storage endpoint"}


def environment(credentials: bool = True) -> dict[str, str]:
    """This process's environment without any AWS setting, plus the test credentials (or none at all)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(TEST_CREDENTIALS if credentials else {"AWS_EC2_METADATA_DISABLED": "true"})
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    return env


def barlow(*args: str, credentials: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real `barlow` executable; a run past `timeout` (a hang) fails the test."""
    return subprocess.run([str(BARLOW), *args], cwd=ROOT, env=environment(credentials), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error(result: subprocess.CompletedProcess, url: str, cause: str) -> str:
    """Exit 2 and exactly one `barlow: URL: ...cause...` line; no traceback, no secret. Returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and SECRET not in output, output
    lines = [line for line in output.splitlines() if line.startswith("barlow:")]
    assert len(lines) == 1 and lines[0].startswith(f"barlow: {url}: ") and cause in lines[0], output
    return lines[0]


def buckets(server: S3Server) -> list[str]:
    client = boto3.client("s3", endpoint_url=server.endpoint_url,
                          aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=SECRET, region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"])
    return [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A valid checkpoint of a tiny model in a local folder."""
    run = tmp_path_factory.mktemp("exported") / "run"
    training = Training(str(run))
    training.step(0)
    training.manager.save(4, wait=True)
    training.manager.close()
    return f"{run}/checkpoints/step-000000004"


@pytest.fixture(scope="module")
def strict_s3_server():
    """A moto server that rejects every request not signed with credentials it knows (the test ones are not)."""
    server = S3Server(enforce_auth=True).start()
    yield server
    server.stop()


def test_export_to_a_missing_bucket_is_an_error_and_creates_no_bucket(local_checkpoint, s3_server, tmp_path):
    result = barlow("export", local_checkpoint, "s3://absent/x.pth", "--endpoint-url", s3_server.endpoint_url)
    assert result.stderr.strip() == f"barlow: s3://absent/x.pth: {MISSING_BUCKET}", result.stdout + result.stderr
    assert_one_error(result, "s3://absent/x.pth", MISSING_BUCKET)
    assert "absent" not in buckets(s3_server)
    # a local path still gets its missing folders
    out = tmp_path / "new" / "folder" / "x.pth"
    result = barlow("export", local_checkpoint, str(out))
    assert result.returncode == 0 and out.is_file(), result.stdout + result.stderr


@pytest.mark.parametrize("case", ["missing bucket", "no such run", "local folder that does not exist"])
def test_ls_of_a_run_that_is_not_there_is_an_error(case, s3_server, tmp_path):
    bucket = s3_server.create_bucket(f"ls-{uuid.uuid4().hex[:8]}")
    url, cause = {"missing bucket": ("s3://absent/runs/x", MISSING_BUCKET),
                  "no such run": (f"{bucket}/runs/nope", "nothing is stored under this URL"),
                  "local folder that does not exist": (str(tmp_path / "nope"),
                                                       "nothing is stored under this URL")}[case]
    assert_one_error(barlow("checkpoints", "ls", url, "--endpoint-url", s3_server.endpoint_url), url, cause)
    assert "absent" not in buckets(s3_server)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_ls_of_a_run_without_checkpoints_says_so(where, s3_server, tmp_path):
    if where == "s3":
        bucket = s3_server.create_bucket(f"empty-run-{uuid.uuid4().hex[:8]}")
        url = f"{bucket}/runs/started"
        boto3.client("s3", endpoint_url=s3_server.endpoint_url, **{
            "aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": SECRET,
            "region_name": "us-east-1"}).put_object(Bucket=bucket.removeprefix("s3://"), Key="runs/started/stats.txt",
                                                    Body=b"barlow train\n")
    else:
        (tmp_path / "started").mkdir()
        url = str(tmp_path / "started")
    result = barlow("checkpoints", "ls", url, "--endpoint-url", s3_server.endpoint_url)
    assert result.returncode == 0 and result.stdout == f"no checkpoints under {url}\n", result.stdout + result.stderr


@pytest.mark.parametrize("case", list(CAUSES))
@pytest.mark.parametrize("command", ["ls", "export"])
def test_unusable_storage_is_one_line_without_traceback_or_secret(command, case, s3_server, strict_s3_server,
                                                                   tmp_path):
    endpoint = {"rejected credentials": strict_s3_server.endpoint_url, "no credentials": s3_server.endpoint_url,
                "unreachable": f"http://127.0.0.1:{free_port()}"}[case]
    run = "s3://somewhere/runs/x"
    out = tmp_path / "x.pth"
    if command == "ls":
        url, args = run, ["checkpoints", "ls", run]
    else:
        url = f"{run}/checkpoints/step-000000004"
        args = ["export", url, str(out)]
    result = barlow(*args, "--endpoint-url", endpoint, credentials=case != "no credentials")
    assert_one_error(result, url, CAUSES[case])
    assert "somewhere" not in buckets(s3_server) and not out.exists()


def write_image_folder(root: Path) -> Path:
    """`root/train/<a|b>/<i>.png`: four 8x8 PNGs per class."""
    for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i in range(4):
            PIL.Image.new("RGB", (8, 8), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    return root


TINY_SPEC = """
data: {{dataset: imagefolder, path: {data}, image_size: 8, workers: 0}}
augment: {{blur: [0.0, 0.0]}}
model: {{backbone: resnet18, stem: cifar, projector: 16-16}}
optim: {{batch_size: 4, epochs: 1, warmup_epochs: 0}}
run: {{output: {output}, precision: fp32, device: cpu, log_every: 1}}
"""


def test_fifo_in_an_image_folder_is_refused_before_training(tmp_path):
    data = write_image_folder(tmp_path / "data")
    fifo = data / "train" / "a" / "x.png"
    os.mkfifo(fifo)
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.format(data=data, output=tmp_path / "run"))
    result = barlow("train", str(spec), timeout=120)  # reading the FIFO would block for ever
    assert_one_error(result, str(fifo), "not a regular file (a FIFO, socket or device)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_folder_skips_special_files_without_an_image_extension(tmp_path):
    data = write_image_folder(tmp_path / "data")
    os.mkfifo(data / "train" / "a" / "notes")  # never opened: not an image name, as torchvision's default
    images = ImageFolder(str(data))
    assert len(images) == 8 and images.classes == ["a", "b"]


def test_fifos_in_place_of_the_cifar10_files_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        os.mkfifo(folder / name)
    with pytest.raises(DataError, match="CIFAR-10 not found"):  # torchvision checks isfile before it opens one
        Cifar10(str(tmp_path))
