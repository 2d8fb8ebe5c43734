"""What `barlow` says when storage cannot be used, its entry point (service.cli.main.main) called in this process
against moto S3 servers: one `barlow: URL: cause` line on standard error, exit status 2, no traceback, no secret,
and nothing created on the way (no bucket). Each command runs with the test credentials (or none) in its environment
and nothing from this machine's AWS configuration. tests/e2e/test_cli_errors.py runs the real executable for each
command once.
"""

import functools
import uuid

import pytest

from service.cli import parser as cli_parser
from service.spec import StorageSpec
from tests.support.commands import barlow
from tests.support.s3_server import S3Server, free_port
from tests.support.user_errors import (
    CAUSES,
    MISSING_BUCKET,
    assert_one_error,
    aws_environment,
    buckets,
    s3_client,
)


@pytest.fixture(scope="module")
def strict_s3_server():
    """A moto server that rejects every request not signed with credentials it knows (the test ones are not)."""
    server = S3Server(enforce_auth=True).start()
    yield server
    server.stop()


@pytest.mark.parametrize("case", ["missing bucket", "no such run", "local folder that does not exist"])
def test_ls_of_a_run_that_is_not_there_is_an_error(case, s3_server, tmp_path):
    bucket = s3_server.create_bucket(f"ls-{uuid.uuid4().hex[:8]}")
    url, cause = {"missing bucket": ("s3://absent/runs/x", MISSING_BUCKET),
                  "no such run": (f"{bucket}/runs/nope", "nothing is stored under this URL"),
                  "local folder that does not exist": (str(tmp_path / "nope"),
                                                       "nothing is stored under this URL")}[case]
    result = barlow("checkpoints", "ls", url, "--endpoint-url", s3_server.endpoint_url, env=aws_environment())
    assert_one_error(result, url, cause)
    assert "absent" not in buckets(s3_server)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_ls_of_a_run_without_checkpoints_says_so(where, s3_server, tmp_path):
    if where == "s3":
        bucket = s3_server.create_bucket(f"empty-run-{uuid.uuid4().hex[:8]}")
        url = f"{bucket}/runs/started"
        s3_client(s3_server).put_object(Bucket=bucket.removeprefix("s3://"), Key="runs/started/stats.txt",
                                        Body=b"barlow train\n")
    else:
        (tmp_path / "started").mkdir()
        url = str(tmp_path / "started")
    result = barlow("checkpoints", "ls", url, "--endpoint-url", s3_server.endpoint_url, env=aws_environment())
    assert result.returncode == 0 and result.stdout == f"no checkpoints under {url}\n", result.stdout + result.stderr


@pytest.fixture
def no_retries(monkeypatch):
    """The storage settings the CLI builds, without retries: an unreachable endpoint fails at once instead of after
    botocore's backoff (half a minute a command), with the same error. `barlow checkpoints ls` and `barlow export`
    have no option for it."""
    monkeypatch.setattr(cli_parser, "StorageSpec", functools.partial(StorageSpec, retries=0))


@pytest.mark.parametrize("case", list(CAUSES))
@pytest.mark.parametrize("command", ["ls", "export"])
def test_unusable_storage_is_one_line_without_traceback_or_secret(command, case, s3_server, strict_s3_server,
                                                                   tmp_path, request):
    endpoint = {"rejected credentials": strict_s3_server.endpoint_url, "no credentials": s3_server.endpoint_url,
                "unreachable": f"http://127.0.0.1:{free_port()}"}[case]
    if case == "unreachable":
        request.getfixturevalue("no_retries")
    run = "s3://somewhere/runs/x"
    out = tmp_path / "x.pth"
    if command == "ls":
        url, args = run, ["checkpoints", "ls", run]
    else:
        url = f"{run}/checkpoints/step-000000004"
        args = ["export", url, str(out)]
    result = barlow(*args, "--endpoint-url", endpoint, env=aws_environment(credentials=case != "no credentials"))
    assert_one_error(result, url, CAUSES[case])
    assert "somewhere" not in buckets(s3_server) and not out.exists()
