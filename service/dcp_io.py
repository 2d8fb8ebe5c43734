"""torch.distributed.checkpoint (DCP) over fsspec: the only module that touches DCP's private fsspec storage.

`FsspecWriter`/`FsspecReader` live in `torch.distributed.checkpoint._fsspec_filesystem` (private in torch 2.14).
The writer here also records the size and CRC32 of every object it writes, as the bytes go out, so the
checkpoint's manifest can list them without reading the checkpoint back.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter


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
            yield counted
        with self._lock:
            self.objects[os.path.basename(os.fspath(path))] = {"size": counted.size, "crc32": counted.crc32}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            self.objects[os.path.basename(os.fspath(new_path))] = self.objects.pop(os.path.basename(os.fspath(path)))


class ChecksummingWriter(FsspecWriter):
    """A DCP writer to any fsspec URL that never overwrites and records what it wrote in `objects`."""

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


def save(state: dict, url: str, fsspec_options: dict, process_group=None) -> dict[str, dict[str, int]]:
    """Write `state` as a DCP checkpoint under `url`; returns this rank's objects with sizes and CRC32s."""
    writer = ChecksummingWriter(url, **fsspec_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=writer, process_group=process_group)
    return writer.objects


def load(state: dict, url: str, fsspec_options: dict, process_group=None) -> None:
    """Fill `state` in place from the DCP checkpoint under `url` (a subset of its keys is fine)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=FsspecReader(url, **fsspec_options), process_group=process_group)


CheckpointException = dcp.api.CheckpointException
