"""Object storage through fsspec: one place that turns a run URL and the spec's storage settings into a
filesystem, and storage failures into messages that say what to do.

Credentials are never read from the spec and never printed: S3 uses the standard AWS chain (environment, profile,
web identity for IRSA on EKS).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol, TypeVar

import fsspec
from fsspec.core import url_to_fs

from service.errors import StorageError

log = logging.getLogger("barlow")
T = TypeVar("T")


class StorageSettings(Protocol):
    """How to reach a URL's store: the spec's `storage` section (service.spec.StorageSpec) is one. Storage lies
    below the spec, so it names only what it reads."""

    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def options(self) -> dict[str, Any]: ...


def is_remote(url: str) -> bool:
    protocol = fsspec.utils.get_protocol(url)
    return protocol not in ("file", "local")


def fsspec_options(url: str, spec: StorageSettings, retries: int | None = None) -> dict[str, Any]:
    """The fsspec options of `url`'s filesystem for the spec's storage settings (`retries`: instead of theirs)."""
    options = copy.deepcopy(spec.options)  # the defaults below go into nested dicts: never into the spec's
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        if spec.endpoint_url:
            options.setdefault("endpoint_url", spec.endpoint_url)
        if spec.profile:
            options.setdefault("profile", spec.profile)
        if spec.region:
            options.setdefault("client_kwargs", {}).setdefault("region_name", spec.region)
        options.setdefault("use_listings_cache", False)  # other workers and runs change the bucket under us
        config = options.setdefault("config_kwargs", {})
        attempts = (spec.retries if retries is None else retries) + 1
        config.setdefault("retries", {"max_attempts": attempts, "mode": "standard"})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 120)
    return options


def filesystem(url: str, spec: StorageSettings, retries: int | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path of `url` (`retries`: instead of the settings')."""
    try:
        return url_to_fs(url, **fsspec_options(url, spec, retries))
    except ImportError as error:
        raise StorageError(f"{url}: no filesystem installed for this protocol ({error})") from None


def explain(url: str, error: BaseException) -> str:
    """A one-line cause for a storage failure, without credentials."""
    name = type(error).__name__
    text = str(error)
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        cause = ("no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE (storage.profile), "
                 "or a service account with IRSA")
    elif isinstance(error, PermissionError) or any(
        code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")
    ):
        cause = "access denied: the credentials are wrong or lack permission for this bucket"
    elif isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
        cause = "the bucket or folder does not exist: create it, or fix the URL"
    elif "Could not connect" in text or "Connect timeout" in text or "EndpointConnectionError" in name or isinstance(
        error, (ConnectionError, TimeoutError)
    ):
        cause = "cannot reach the storage endpoint: check storage.endpoint_url, the network and the region"
    else:
        cause = f"{name}: {text.splitlines()[0] if text else 'no detail'}"
    return f"{url}: {cause}"


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a storage call raises for a missing bucket, bad credentials or an unreachable endpoint:
    OSError (fsspec's translations: FileNotFoundError, PermissionError, ConnectionError...) and botocore's own."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no S3 support installed
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def require_exists(url: str, spec: StorageSettings) -> None:
    """Raise StorageError naming `url` when nothing is stored there: its bucket is missing, or no object or folder
    is under it. Other failures (credentials, network) propagate, for explain()."""
    fs, path = filesystem(url, spec)
    try:
        fs.info(path)
        return
    except FileNotFoundError:
        pass
    if is_remote(url) and path.strip("/"):
        try:
            fs.info(path.strip("/").split("/", 1)[0])  # the bucket
        except FileNotFoundError as error:
            raise StorageError(explain(url, error)) from None
    raise StorageError(f"{url}: nothing is stored under this URL: check it (a run's run.output)")


@contextlib.contextmanager
def open_for_writing(url: str, spec: StorageSettings) -> Iterator[IO[bytes]]:
    """`url` opened for writing, replacing what is there; a failure is a StorageError naming the URL. Only a local
    path gets its missing folders: on an object store makedirs would create a missing bucket."""
    fs, path = filesystem(url, spec)
    try:
        if not is_remote(url):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as file:
            yield file
    except storage_errors() as error:
        raise StorageError(explain(url, error)) from None


def write_bytes(url: str, spec: StorageSettings, data: bytes) -> None:
    """Write one small object whole (see open_for_writing)."""
    with open_for_writing(url, spec) as file:
        file.write(data)


def check_writable(url: str, spec: StorageSettings) -> None:
    """Fail fast, before any training, when the run's location cannot be written (one quick attempt)."""
    fs, path = filesystem(url, spec, retries=0)
    probe = f"{path.rstrip('/')}/.barlow-write-check-{uuid.uuid4().hex}"  # one per worker: they probe at once
    try:
        if not is_remote(url):
            fs.makedirs(path, exist_ok=True)  # on object stores this would create a missing bucket
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as error:  # noqa: BLE001 - every failure here means the same thing to the user
        raise StorageError(explain(url, error)) from None


def retry(action: Callable[[], T], what: str, attempts: int = 5, first_delay: float = 0.5) -> T:
    """Run `action`, retrying transient failures with exponential backoff; the last failure propagates."""
    for attempt in range(attempts):
        try:
            return action()
        except (OSError, TimeoutError) as error:
            if attempt == attempts - 1 or isinstance(error, (FileNotFoundError, PermissionError)):
                raise
            delay = first_delay * 2**attempt
            log.warning("%s failed (%s); retrying in %.1f s", what, type(error).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
