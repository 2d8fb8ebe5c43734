"""What `barlow` must print when storage, data or a spec cannot be used (one `barlow: ...` line on standard error,
exit status 2, no traceback, no secret), the environment such a command runs in, and inputs that cause it: a tiny
image folder (for special files beside its images), a YAML alias bomb."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import PIL.Image

from tests.support.s3_server import TEST_CREDENTIALS, S3Server

SECRET = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
MISSING_BUCKET = "the bucket or folder does not exist: create it, or fix the URL"
CAUSES = {"rejected credentials": "access denied", "no credentials": "no credentials found",
          "unreachable": "cannot reach the storage endpoint"}


def aws_environment(credentials: bool = True) -> dict[str, str | None]:
    """Over this process's environment: every AWS setting unset (None), then the test credentials (or none at all)
    and no AWS configuration files of this machine."""
    env: dict[str, str | None] = {key: None for key in os.environ if key.startswith("AWS_")}
    env.update(TEST_CREDENTIALS if credentials else {"AWS_EC2_METADATA_DISABLED": "true"})
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    return env


def assert_one_error(result, url: str, cause: str) -> str:
    """Exit 2 and exactly one `barlow: URL: ...cause...` line; no traceback, no secret. Returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and SECRET not in output, output
    lines = [line for line in output.splitlines() if line.startswith("barlow:")]
    assert len(lines) == 1 and lines[0].startswith(f"barlow: {url}: ") and cause in lines[0], output
    return lines[0]


def s3_client(server: S3Server):
    return boto3.client("s3", endpoint_url=server.endpoint_url,
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET,
                        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"])


def buckets(server: S3Server) -> list[str]:
    return [bucket["Name"] for bucket in s3_client(server).list_buckets()["Buckets"]]


def write_image_folder(root: Path) -> Path:
    """`root/train/<a|b>/<i>.png`: four 8x8 PNGs per class."""
    for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i in range(4):
            PIL.Image.new("RGB", (8, 8), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    return root


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs": `levels` lists of `width` aliases of the previous one, width**levels strings in all."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"
