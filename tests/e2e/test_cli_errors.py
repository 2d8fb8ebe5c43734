"""What the `barlow` executable says when storage or data cannot be used: one `barlow: URL: cause` line on
standard error, exit status 2, no traceback, no secret, and nothing created on the way (no bucket).

Every case runs the real executable in a subprocess, against moto S3 servers started by the tests, with the test
credentials (or none) in its environment and nothing from this machine's AWS configuration: once for each command
and kind of failure that differs in the process (a refused request, no credentials at all, a FIFO that would block).
Every cause through the entry point in process: tests/integration/test_cli_errors.py.
"""

import os

import pytest

from tests.support.commands import barlow
from tests.support.s3_server import S3Server
from tests.support.training import Training
from tests.support.user_errors import (
    CAUSES,
    MISSING_BUCKET,
    assert_one_error,
    aws_environment,
    buckets,
    write_image_folder,
)


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


def barlow_executable(*args: str, credentials: bool = True, timeout: float = 180):
    """The real `barlow` executable; a run past `timeout` (a hang) fails the test."""
    return barlow(*args, env=aws_environment(credentials), executable=True, timeout=timeout)


def test_export_to_a_missing_bucket_is_an_error_and_creates_no_bucket(local_checkpoint, s3_server, tmp_path):
    result = barlow_executable("export", local_checkpoint, "s3://absent/x.pth", "--endpoint-url",
                               s3_server.endpoint_url)
    assert result.stderr.strip() == f"barlow: s3://absent/x.pth: {MISSING_BUCKET}", result.stdout + result.stderr
    assert_one_error(result, "s3://absent/x.pth", MISSING_BUCKET)
    assert "absent" not in buckets(s3_server)
    # a local path still gets its missing folders
    out = tmp_path / "new" / "folder" / "x.pth"
    result = barlow_executable("export", local_checkpoint, str(out))
    assert result.returncode == 0 and out.is_file(), result.stdout + result.stderr


@pytest.mark.parametrize("command, case", [("ls", "rejected credentials"), ("export", "no credentials")])
def test_unusable_storage_is_one_line_without_traceback_or_secret(command, case, s3_server, strict_s3_server,
                                                                   tmp_path):
    endpoint = {"rejected credentials": strict_s3_server.endpoint_url, "no credentials": s3_server.endpoint_url}[case]
    run = "s3://somewhere/runs/x"
    out = tmp_path / "x.pth"
    if command == "ls":
        url, args = run, ["checkpoints", "ls", run]
    else:
        url = f"{run}/checkpoints/step-000000004"
        args = ["export", url, str(out)]
    result = barlow_executable(*args, "--endpoint-url", endpoint, credentials=case != "no credentials")
    assert_one_error(result, url, CAUSES[case])
    assert "somewhere" not in buckets(s3_server) and not out.exists()


TINY_SPEC = """
data: {{dataset: imagefolder, path: {data}, image_size: 8, workers: 0}}
augment: {{blur: [0.0, 0.0]}}
model: {{backbone: resnet18, stem: cifar, projector: 16-16}}
optim: {{batch_size: 4, epochs: 1, warmup_epochs: 0}}
run: {{output: {output}, precision: fp32, device: cpu, log_every: 1}}
"""


def test_fifo_in_an_image_folder_is_refused_before_training(tmp_path):
    """In a subprocess: were the FIFO opened, the read would block for ever, which only a timeout can show."""
    data = write_image_folder(tmp_path / "data")
    fifo = data / "train" / "a" / "x.png"
    os.mkfifo(fifo)
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.format(data=data, output=tmp_path / "run"))
    result = barlow_executable("train", str(spec), timeout=120)
    assert_one_error(result, str(fifo), "not a regular file (a FIFO, socket or device)")
    assert not (tmp_path / "run" / "checkpoints").exists()
