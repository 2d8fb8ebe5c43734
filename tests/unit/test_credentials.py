"""service/credentials.py: which keys name a credential, and command lines redacted before they are recorded."""

from __future__ import annotations

import pytest

from service.credentials import is_credential_key, redact_arguments

SECRET = "Sekr1tValue"  # what must never be printed


# ---- credentials ----

CREDENTIAL_KEYS = ["key", "secret", "token", "password", "passwd", "session_token", "security_token", "access_key",
                   "secret_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "credentials",
                   "private_key", "sas_token", "account_key", "client_secret", "AWS_SECRET_ACCESS_KEY",
                   "SecretAccessKey", "secretaccesskey", "Session-Token", "SSECustomerKey", "Authorization", "api_key"]
ORDINARY_KEYS = ["endpoint_url", "region_name", "use_listings_cache", "retries", "max_attempts", "anon", "profile",
                 "signature_version", "addressing_style", "requester_pays", "default_block_size", "SSEKMSKeyId",
                 "client_kwargs", "config_kwargs", "s3_additional_kwargs", "account_name", "project", "monkey"]


def test_credential_key_predicate():
    assert [key for key in CREDENTIAL_KEYS if not is_credential_key(key)] == []
    assert [key for key in ORDINARY_KEYS if is_credential_key(key)] == []


# ---- command lines recorded redacted ----

@pytest.mark.parametrize("args, expected", [
    (["--set", f"storage.options.secret={SECRET}"], ["--set", "storage.options.secret=***"]),
    ([f"--set=storage.options.client_kwargs.aws_secret_access_key={SECRET}"],
     ["--set=storage.options.client_kwargs.aws_secret_access_key=***"]),
    ([f"storage.options.key={SECRET}"], ["storage.options.key=***"]),
    ([f"storage.options.credentials.file={SECRET}"], ["storage.options.credentials.file=***"]),  # any dotted part
    ([f"AWS_SECRET_ACCESS_KEY={SECRET}", f"--env=AWS_SESSION_TOKEN={SECRET}"],
     ["AWS_SECRET_ACCESS_KEY=***", "--env=AWS_SESSION_TOKEN=***"]),
    (["--set", f"storage.options={{token: {SECRET}}}"], ["--set", "storage.options=***"]),
    (["--set", f"storage.endpoint_url=https://minio:{SECRET}@minio.local:9000/x"],
     ["--set", "storage.endpoint_url=https://***@minio.local:9000/x"]),
    ([f"https://u:p@{SECRET}@host/path@x"], ["https://***@host/path@x"]),  # user info up to the host's @
    (["train", "specs/digits.yaml", "--set", "optim.epochs=3", "--set", "storage.endpoint_url=http://minio:9000",
      "--set", "storage.options.client_kwargs.region_name=eu-west-1", "--set", "run.output=s3://bucket/runs/x"],
     ["train", "specs/digits.yaml", "--set", "optim.epochs=3", "--set", "storage.endpoint_url=http://minio:9000",
      "--set", "storage.options.client_kwargs.region_name=eu-west-1", "--set", "run.output=s3://bucket/runs/x"]),
])
def test_redact_arguments(args, expected):
    assert redact_arguments(args) == expected
