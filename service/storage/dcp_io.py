"""torch.distributed.checkpoint (DCP) over fsspec: the only module that touches DCP's private fsspec storage.

`FsspecWriter`/`FsspecReader` live in `torch.distributed.checkpoint._fsspec_filesystem` (private in torch 2.14).
The writer here also records the size and CRC32 of every object it writes, as the bytes go out, so the
checkpoint's manifest can list them without reading the checkpoint back; the reader checks every object it opens
against them as the bytes come in, before DCP unpickles or deserialises any of it.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

CheckpointException = dcp.api.CheckpointException  # a BaseException: `except Exception` does not catch it


class _ChecksumStream:
    """Passes writes through to `stream`, counting bytes and updating a CRC32."""

    def __init__(self, stream):
        self.stream = stream
        self.size = 0
        self.crc32 = 0

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        self.size += len(view)
        return self.stream.write(data)


class _ChecksummingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            counted = _ChecksumStream(stream)
            yield counted  # type: ignore[misc]  # duck-typed: an IOBase subclass would not pass close() etc. through
        with self._lock:
            self.objects[os.path.basename(os.fspath(path))] = {"size": counted.size, "crc32": counted.crc32}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            self.objects[os.path.basename(os.fspath(new_path))] = self.objects.pop(os.path.basename(os.fspath(path)))


class ChecksummingWriter(FsspecWriter):
    """A DCP writer to any fsspec URL that never overwrites and records what it wrote in `objects`."""

    fs: _ChecksummingFileSystem  # type: ignore[assignment]  # torch types `fs` as its base's (not fsspec's) FileSystem

    def __init__(self, url: str, **fsspec_options: Any):
        # fsync only means something for local files; elsewhere DCP would fall back to a system-wide sync.
        local = fsspec.utils.get_protocol(url) in ("file", "local")
        super().__init__(url, overwrite=False, sync_files=local, **fsspec_options)
        checksummed = _ChecksummingFileSystem()
        checksummed.fs = self.fs.fs
        self.fs = checksummed

    @property
    def objects(self) -> dict[str, dict[str, int]]:
        return dict(self.fs.objects)


class CorruptCheckpoint(RuntimeError):
    """An object of a checkpoint does not match its manifest; the message names the object and the difference."""


def read_verified(fs: fsspec.AbstractFileSystem, path: str, expected: dict[str, dict[str, int]]) -> bytes:
    """The whole object at `path` (one GET), checked against its manifest entry: size and CRC32."""
    name = os.path.basename(path.rstrip("/"))
    listed = expected.get(name)
    if listed is None:
        raise CorruptCheckpoint(f"object {name} is not listed in the manifest")
    data = fs.cat_file(path)
    _compare(name, len(data), zlib.crc32(data), listed)
    return data


def check_object(fs: fsspec.AbstractFileSystem, path: str, listed: dict[str, int], chunk: int = 16 << 20) -> None:
    """Stream one object and compare its size and CRC32 with its manifest entry, holding one chunk at a time."""
    name = os.path.basename(path.rstrip("/"))
    size, crc32 = 0, 0
    with fs.open(path, "rb", block_size=chunk) as stream:
        while block := stream.read(chunk):
            size += len(block)
            crc32 = zlib.crc32(block, crc32)
    _compare(name, size, crc32, listed)


def _compare(name: str, size: int, crc32: int, listed: dict[str, int]) -> None:
    if size != listed["size"]:
        raise CorruptCheckpoint(f"object {name} holds {size} bytes, the manifest says {listed['size']}")
    if crc32 != listed["crc32"]:
        raise CorruptCheckpoint(f"object {name} has CRC32 {crc32:08x}, the manifest says {listed['crc32']:08x}")


class _VerifyingFileSystem(FileSystem):
    """Reads each object whole and checks it against the manifest before DCP sees a byte of it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, expected: dict[str, dict[str, int]]) -> None:
        super().__init__()
        self.fs = fs
        self.expected = expected
        self.corruption: CorruptCheckpoint | None = None  # the first mismatch, whatever DCP makes of it

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "r" not in mode or "+" in mode:
            raise ValueError(f"a verified checkpoint is read only (mode {mode!r})")
        try:
            data = read_verified(self.fs, os.fspath(path), self.expected)
        except CorruptCheckpoint as error:
            self.corruption = self.corruption or error
            raise
        yield io.BytesIO(data)


class VerifyingReader(FsspecReader):
    """A DCP reader from any fsspec URL that loads nothing it has not checked against the manifest's objects."""

    fs: _VerifyingFileSystem  # type: ignore[assignment]  # torch types `fs` as its base's (not fsspec's) FileSystem

    def __init__(self, url: str, expected: dict[str, dict[str, int]], **fsspec_options: Any):
        super().__init__(url, **fsspec_options)
        self.fs = _VerifyingFileSystem(self.fs.fs, expected)


def save(state: dict, url: str, fsspec_options: dict, process_group=None) -> dict[str, dict[str, int]]:
    """Write `state` as a DCP checkpoint under `url`; returns this rank's objects with sizes and CRC32s."""
    writer = ChecksummingWriter(url, **fsspec_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=writer, process_group=process_group)
    return writer.objects


def load(state: dict, url: str, expected: dict[str, dict[str, int]], fsspec_options: dict,
         process_group=None) -> None:
    """Fill `state` in place from the DCP checkpoint under `url` (a subset of its keys is fine), checking every
    object read against `expected` (name -> size, crc32: the manifest's objects).

    Raises CorruptCheckpoint on every rank when any rank read an object that does not match, and the first
    rank's own exception (a storage error) for any other failure, instead of DCP's multi-rank report.
    """
    reader = VerifyingReader(url, expected, **fsspec_options)
    try:
        with warnings.catch_warnings(), _quiet_dcp():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=reader, process_group=process_group)
    except (Exception, CheckpointException) as error:
        # DCP reports a bad `.metadata` as an AssertionError after trying rank-local metadata, and a bad data
        # object of any rank as a CheckpointException of every rank's failures.
        if reader.fs.corruption is not None:
            raise reader.fs.corruption from None
        if not isinstance(error, CheckpointException):
            raise
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        corrupt = [cause for cause in causes if isinstance(cause, CorruptCheckpoint)]
        if not (corrupt or causes):
            raise
        raise (corrupt or causes)[0] from None


@contextmanager
def _quiet_dcp() -> Generator[None, None, None]:
    """DCP logs a traceback at WARNING (to its module's logger, the root logger in torch 2.14) when `.metadata`
    cannot be read; the caller reports the cause in one line."""
    logger = state_dict_loader.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

