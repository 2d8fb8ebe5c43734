"""A real S3 HTTP endpoint for the tests: a moto server process on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata endpoint for credentials
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """Start, stop and restart a moto server; its buckets live only as long as the process."""

    def __init__(self, port: int | None = None, enforce_auth: bool = False, host: str = "127.0.0.1"):
        self.port = port or free_port()
        self.host = host  # 0.0.0.0 for containers on a bridge network (they cannot reach the host's loopback)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.enforce_auth = enforce_auth
        self.process: subprocess.Popen | None = None

    def start(self) -> S3Server:
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        env = {**os.environ, **TEST_CREDENTIALS}
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # every request must carry credentials moto knows
        self.process = subprocess.Popen([executable, "-H", self.host, "-p", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials()).create_bucket(Bucket=name)
        return f"s3://{name}"


def _boto_credentials() -> dict:
    return dict(aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"])
