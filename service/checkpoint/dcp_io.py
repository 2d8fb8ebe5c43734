"""torch.distributed.checkpoint (DCP) over fsspec: the only module that touches DCP's private fsspec storage.

`FsspecWriter`/`FsspecReader` live in `torch.distributed.checkpoint._fsspec_filesystem` (private in torch 2.14).
The writer here also records the size and CRC32 of every object it writes, as the bytes go out, so the
checkpoint's manifest can list them without reading the checkpoint back; the reader checks every object it opens
against them as the bytes come in, before DCP unpickles or deserialises any of it.

A checkpoint carries data, never code. A CRC32 catches damage, not a writer (who writes the objects writes the
manifest too), so what DCP would unpickle freely is read here under restrictions: `.metadata` (and a rank's
`__N.metadata`) with an unpickler that builds only the classes DCP's metadata is made of (`METADATA_GLOBALS`), and
every non-tensor item with `torch.load(weights_only=True)`, as DCP already reads tensors. Anything else is
refused, before any of it runs, as a corrupt checkpoint.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import pickle
import threading
import warnings
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from service.storage.untrusted import UntrustedObject, checked_name

# ~50 KB for a ResNet-50 and its optimizer on one worker; a model of 10,000 tensors on 1,000 workers needs ~10 MB
METADATA_LIMIT = 256 << 20
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


class ForeignObject(CorruptCheckpoint):
    """A checkpoint's object holds what this project never writes there: a pickle of another class (code, once
    unpickled), or a path where a name belongs. Refused before any of it is built."""


# Every global a DCP `.metadata` of this project's checkpoints refers to (torch 2.14), besides torch's dtypes and,
# from Python 3.12 on, `builtins.getattr` for Enum members (admitted for that alone: `_enum_member`):
# tests/unit/checkpoint/test_dcp_io.py lists what real checkpoints of every kind need, so a torch that adds one
# fails there.
METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: built from its value
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which object and byte range holds an item
    ("torch", "Size"),  # a tuple subclass
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided and its kind by name
})
_DTYPES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


def _enum_member(cls: object, name: object) -> object:
    """What `builtins.getattr` may do in metadata: Python >= 3.12 pickles an Enum member as getattr(its class, its
    name). Any other use (getattr reaches a function's globals, and from there any module) is refused."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)
            and (cls.__module__, cls.__qualname__) in METADATA_GLOBALS and isinstance(name, str)
            and name in cls.__members__):
        raise ForeignObject(f"DCP metadata would call getattr({cls!r}, {name!r}), which only names an Enum member "
                            "of DCP's metadata: refused")
    return cls[name]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data))
        self.name = name

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        raise ForeignObject(f"{self.name} would load {module}.{name}, which DCP's metadata never holds (code, once "
                            "unpickled): refused before any of it ran")

    def persistent_load(self, pid: object) -> object:
        raise ForeignObject(f"{self.name} refers to a persistent object, which DCP's metadata never holds: refused")


def read_metadata(data: bytes, name: str = ".metadata") -> Metadata:
    """DCP's metadata from the bytes of `.metadata`, built only from METADATA_GLOBALS; ForeignObject otherwise.
    The object names it refers to must be plain names inside the checkpoint."""
    try:
        metadata = _MetadataUnpickler(data, name).load()
    except ForeignObject:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated or malformed pickle, whatever pickle makes of it
        raise CorruptCheckpoint(f"{name} is not DCP metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise ForeignObject(f"{name} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        checked_name_of(getattr(info, "relative_path", None), name)
    return metadata


def checked_name_of(name: object, where: str) -> str:
    """An object name read from a checkpoint (its manifest or its metadata): one plain name, never a path."""
    try:
        return checked_name(name, where)
    except UntrustedObject as error:
        raise ForeignObject(str(error)) from None


def load_item(data: io.BytesIO, fqn: str) -> object:
    """A non-tensor item of the state (an optimizer's hyperparameters): primitives, containers and tensors only."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only's message names what it refused amid its advice
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["not data"]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise ForeignObject(f"item {fqn}: {reason.rstrip('.')}; a checkpoint's items are data: refused before any "
                            "of it ran") from None
    except Exception as error:  # noqa: BLE001 - bytes torch.save did not write (a truncated or foreign archive)
        raise CorruptCheckpoint(f"item {fqn} is not what torch.save writes ({type(error).__name__})") from None


def read_verified(fs: fsspec.AbstractFileSystem, path: str, expected: dict[str, dict[str, int]]) -> bytes:
    """The whole object at `path` (one GET), checked against its manifest entry: size and CRC32."""
    name = os.path.basename(path.rstrip("/"))
    listed = expected.get(name)
    if listed is None:
        raise CorruptCheckpoint(f"object {name} is not listed in the manifest")
    if name.endswith(".metadata") and listed["size"] > METADATA_LIMIT:
        raise CorruptCheckpoint(f"object {name}: the manifest says {listed['size']:,} bytes, more than DCP metadata "
                                f"holds (at most {METADATA_LIMIT:,}): not read")
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
    """A DCP reader from any fsspec URL that loads nothing it has not checked against the manifest's objects, and
    builds the metadata with the restricted unpickler."""

    fs: _VerifyingFileSystem  # type: ignore[assignment]  # torch types `fs` as its base's (not fsspec's) FileSystem

    def __init__(self, url: str, expected: dict[str, dict[str, int]], **fsspec_options: Any):
        super().__init__(url, **fsspec_options)
        self.fs = _VerifyingFileSystem(self.fs.fs, expected)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # as FileSystemReader.read_metadata, unpickled safely
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        try:
            metadata = read_metadata(data, os.path.basename(os.fspath(path)))
        except CorruptCheckpoint as error:
            self.fs.corruption = self.fs.corruption or error
            raise
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()  # absent from older metadata
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class _ItemsAsDataPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, whose non-tensor items DCP would read with torch.load(weights_only=False)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        item = load_item(value, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], item)
        else:
            self.state_dict[fqn] = item


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
            dcp.load(state, storage_reader=reader, planner=_ItemsAsDataPlanner(), process_group=process_group)
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

