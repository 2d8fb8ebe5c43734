"""Conditional writes of one small object: create it only if absent, replace or delete it only if it is as last
read. What a lease (service/run/lease.py) needs from a store so that two takers cannot both win:

* s3:// (and s3a://): creation is a PUT with `If-None-Match: *`, every later write a PUT with `If-Match: <ETag>`
  and deletion a DELETE with `If-Match`. Needs a store with conditional writes (AWS S3, MinIO, Ceph RGW; the moto
  test server honours all three).
* local paths and file://: every read-compare-write holds an `fcntl.flock` on the sibling `NAME.lock` (never
  deleted); creation also uses `O_EXCL`, replacement writes a temporary file and renames it over the object.
* other protocols (memory://, gs://, ...): best effort, check then write. Within one process a lock makes it exact
  (so memory://, which is per process, is exact); across processes two writers racing within a round trip may both
  believe they won.

Every read returns at most `limit + 1` bytes: what is stored may have been written by anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Conflict(Exception):
    """A conditional write found the object not as expected (taken, changed or gone)."""


@dataclass(frozen=True)
class Stored:
    data: bytes
    version: Any  # the ETag on S3, the bytes elsewhere (as data: never more than limit + 1 bytes are read)
    modified: float | None  # unix time of the last write, when the store says


class Store:
    """One small object on one store. Every method may raise OSError for a storage failure."""

    def read(self) -> Stored | None:
        raise NotImplementedError

    def create(self, data: bytes) -> Any:
        """Write `data` only if nothing is stored; its version. Conflict if something is."""
        raise NotImplementedError

    def replace(self, data: bytes, version: Any) -> Any:
        """Write `data` only if the stored version is `version`; the new version. Conflict if not, or gone."""
        raise NotImplementedError

    def delete(self, version: Any) -> None:
        """Delete only if the stored version is `version`. Conflict if not, or gone."""
        raise NotImplementedError


def store_for(fs: fsspec.AbstractFileSystem, path: str, limit: int) -> Store:
    """The conditional store for `path` on `fs`, reading at most `limit` + 1 bytes."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(path, limit)
    if protocols & {"s3", "s3a"}:
        return S3Store(fs, path, limit)
    return BestEffortStore(fs, path, limit)


class LocalStore(Store):
    """A local file: every operation holds an flock on NAME.lock; creation uses O_EXCL, replacement a rename."""

    def __init__(self, path: str, limit: int):
        self.path = path
        self.limit = limit

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        descriptor = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as file:
                return Stored(file.read(self.limit + 1), None, os.fstat(file.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def read(self) -> Stored | None:
        with self._locked(exclusive=False):
            stored = self._read()
        return stored and replace(stored, version=stored.data)

    def create(self, data: bytes) -> bytes:
        with self._locked():
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise Conflict from None
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        return data

    def replace(self, data: bytes, version: bytes) -> bytes:
        with self._locked():
            stored = self._read()
            if stored is None or stored.data != version:
                raise Conflict
            temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(temporary, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
        return data

    def delete(self, version: bytes) -> None:
        with self._locked():
            stored = self._read()
            if stored is None or stored.data != version:
                raise Conflict
            os.unlink(self.path)


def _precondition_failed(error: BaseException) -> bool:
    """An S3 error that means the condition did not hold: 412 PreconditionFailed, or 409 when a concurrent
    conditional write won."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3Store(Store):
    """An S3 object: `If-None-Match: *` to create, `If-Match: <ETag>` to replace and to delete."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, limit: int):
        self.fs = fs
        self.path = path
        self.limit = limit
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> Stored | None:
        # the ETag first: if the object changes before the GET, a write conditional on this ETag fails
        try:
            info = self.fs.info(self.path, refresh=True)
            data = self.fs.cat_file(self.path, start=0, end=self.limit + 1)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified")
        return Stored(data, info["ETag"], modified.timestamp() if modified is not None else None)

    def _put(self, data: bytes, **condition: str) -> str:
        try:
            return self.fs.pipe_file(self.path, data, **condition)["ETag"]
        except FileNotFoundError:
            if "IfMatch" not in condition:
                raise  # no bucket
            raise Conflict from None  # replacing an object that is gone
        except OSError as error:
            if _precondition_failed(error):
                raise Conflict from None
            raise

    def create(self, data: bytes) -> str:
        return self._put(data, mode="create")

    def replace(self, data: bytes, version: str) -> str:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except FileNotFoundError:
            raise Conflict from None
        except OSError as error:
            if _precondition_failed(error):
                raise Conflict from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)


_BEST_EFFORT_LOCK = threading.Lock()  # exact within one process: memory://, and threads of one job


class BestEffortStore(Store):
    """Any other fsspec store: check, then write (not atomic across processes)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, limit: int):
        self.fs = fs
        self.path = path
        self.limit = limit

    def _read(self) -> Stored | None:
        try:
            data = self.fs.cat_file(self.path, start=0, end=self.limit + 1)
        except FileNotFoundError:
            return None
        try:
            modified = self.fs.modified(self.path).timestamp()
        except (NotImplementedError, OSError, AttributeError):
            modified = None
        return Stored(data, data, modified)

    def read(self) -> Stored | None:
        with _BEST_EFFORT_LOCK:
            return self._read()

    def create(self, data: bytes) -> bytes:
        with _BEST_EFFORT_LOCK:
            if self.fs.exists(self.path):
                raise Conflict
            self.fs.pipe_file(self.path, data)
        return data

    def replace(self, data: bytes, version: bytes) -> bytes:
        with _BEST_EFFORT_LOCK:
            stored = self._read()
            if stored is None or stored.data != version:
                raise Conflict
            self.fs.pipe_file(self.path, data)
        return data

    def delete(self, version: bytes) -> None:
        with _BEST_EFFORT_LOCK:
            stored = self._read()
            if stored is None or stored.data != version:
                raise Conflict
            self.fs.rm_file(self.path)
