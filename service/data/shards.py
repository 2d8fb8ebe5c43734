"""Packed data sets: tar shards of encoded images plus one index object, read by global sample index from any
fsspec URL (s3://, a local folder).

Layout of one split (e.g. `s3://bucket/imagenet/train/`):

    index.npz            written last: its presence commits the split
    3f/train-000000.tar  shards of ~512 MB, under 256 prefixes (S3 serves ~5,500 GET/s per prefix)
    ...

A shard is a plain tar (any tar tool or webdataset reads it): per sample `<key>.<ext>` (the encoded image as it
was) and `<key>.cls` (its label as text). The index holds, for every sample in the data set's order, its shard,
the byte offset and length of the image inside the shard, its label and the CRC32 of its bytes, with the class
names, the shards' keys and sizes, and the samples' names. The sample order is the ImageFolder's (sorted classes,
sorted files), less the images the packer could not decode, so sample i of the shards is sample i of the folder.

An index is read as whoever wrote the data set's bucket left it (`ShardIndex.from_bytes`): at most
MAX_INDEX_BYTES, a zip of exactly the members written here, each stored (never inflated) and a 1-D array of its
dtype whose .npy header declares the bytes the member holds, the header's fields of their types, shard keys names
of the form `shard_key` makes, and every sample's shard, label, byte range and name within what the index holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.storage.untrusted import GiB, MiB, UntrustedObject, checked_name, parse_json

INDEX = "index.npz"
FORMAT = "barlow-shards/1"
PREFIXES = 256
# ImageNet-21k's 14.2M samples take ~63 bytes each (32 in the columns, ~31 of name): an index of ~0.9 GB
MAX_INDEX_BYTES = 2 * GiB
MAX_HEADER_BYTES = 64 * MiB  # its classes, shard keys and sizes, and the images left out: ~1 MB for ImageNet-21k
MAX_SIZE = 2**53  # a shard's size or a sample's offset
COLUMNS = {"shard": np.uint32, "offset": np.uint64, "size": np.uint32, "label": np.int32, "crc32": np.uint32,
           "names": np.uint8, "name_ends": np.int64}
MEMBERS = {"header": np.uint8, **COLUMNS}


def shard_key(split: str, number: int) -> str:
    """The shard's key relative to its split's folder, under one of PREFIXES hashed prefixes."""
    prefix = zlib.crc32(f"{split}-{number}".encode()) % PREFIXES
    return f"{prefix:02x}/{split}-{number:06d}.tar"


@dataclass
class ShardIndex:
    """The index of one split: per sample (shard, offset, size, label, crc32, name), and the split's metadata."""

    classes: list[str]
    shards: list[str]  # keys relative to the split's folder
    shard_sizes: list[int]
    shard: np.ndarray  # uint32, the sample's shard number
    offset: np.ndarray  # uint64, the byte offset of the image's bytes in its shard
    size: np.ndarray  # uint32
    label: np.ndarray  # int32
    crc32: np.ndarray  # uint32
    names: np.ndarray  # uint8, the samples' names joined by newlines (one array: shared by forked processes)
    name_ends: np.ndarray  # int64, the end of each name in `names`
    meta: dict[str, Any]  # source, when and how it was packed, the images left out
    digest: str = ""  # SHA-256 of the index object: names this packing of the data set

    def __len__(self) -> int:
        return len(self.label)

    @property
    def targets(self) -> np.ndarray:
        return self.label

    def name(self, index: int) -> str:
        start = int(self.name_ends[index - 1]) + 1 if index else 0
        return bytes(self.names[start:int(self.name_ends[index])]).decode()

    def all_names(self) -> list[str]:
        return bytes(self.names).decode().split("\n") if len(self) else []

    @property
    def total_bytes(self) -> int:
        return int(sum(self.shard_sizes))

    def to_bytes(self) -> bytes:
        header = dict(format=FORMAT, classes=self.classes, shards=self.shards, shard_sizes=self.shard_sizes,
                      **self.meta)
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), shard=self.shard,
                 offset=self.offset, size=self.size, label=self.label, crc32=self.crc32, names=self.names,
                 name_ends=self.name_ends)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ShardIndex:
        """The index in `data` (an index.npz at `where`); UntrustedObject naming `where` when it is not one this
        project writes (module docstring), before any array is allocated or any shard named in it is used."""
        if len(data) > MAX_INDEX_BYTES:
            raise UntrustedObject(f"{where}: {len(data):,} bytes, more than an index holds (at most "
                                  f"{MAX_INDEX_BYTES:,}): not read")
        try:
            _check_members(data, where)
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                header = _check_header(parse_json(arrays["header"].tobytes(), f"{where} (its header)"), where)
                columns = {name: arrays[name] for name in COLUMNS}
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise UntrustedObject(f"{where} is not a packed data set's index ({error}): pack it with barlow data "
                                  "pack") from None
        index = cls(classes=header.pop("classes"), shards=header.pop("shards"),
                    shard_sizes=header.pop("shard_sizes"), meta=header, digest=hashlib.sha256(data).hexdigest(),
                    **columns)
        _check_columns(index, where)
        return index

    @classmethod
    def build(cls, classes: list[str], shards: list[str], shard_sizes: list[int], samples: list[dict],
              meta: dict[str, Any]) -> ShardIndex:
        """From per-sample records {shard, offset, size, label, crc32, name}, in the data set's order."""
        names = "\n".join(s["name"] for s in samples).encode()
        lengths = np.array([len(s["name"].encode()) for s in samples], dtype=np.int64)
        ends = np.cumsum(lengths + 1) - 1 if len(samples) else np.zeros(0, dtype=np.int64)

        def column(field: str, dtype) -> np.ndarray:
            return np.array([s[field] for s in samples], dtype=dtype)

        return cls(classes=classes, shards=shards, shard_sizes=shard_sizes, shard=column("shard", np.uint32),
                   offset=column("offset", np.uint64), size=column("size", np.uint32),
                   label=column("label", np.int32), crc32=column("crc32", np.uint32),
                   names=np.frombuffer(names, dtype=np.uint8).copy(), name_ends=ends.astype(np.int64), meta=meta)


def _check_members(data: bytes, where: str) -> None:
    """The zip holds exactly MEMBERS, each stored as np.savez stores it (a compressed member could inflate without
    bound: a zip bomb) and a 1-D array of its dtype whose .npy header declares as many bytes as the member holds
    (numpy allocates what a header declares before reading)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        if sorted(info.filename for info in infos) != sorted(f"{name}.npy" for name in MEMBERS):
            raise ValueError(f"its members are {', '.join(info.filename for info in infos[:10])}")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise UntrustedObject(f"{where}: member {info.filename} is compressed ({info.file_size:,} bytes "
                                      f"declared in {info.compress_size:,}); this project writes none: not read")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"member {info.filename}: .npy version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
                declared = member.tell() + math.prod(shape) * dtype.itemsize
            if dtype != np.dtype(MEMBERS[info.filename.removesuffix(".npy")]) or len(shape) != 1 or \
                    declared != info.file_size:
                raise UntrustedObject(f"{where}: member {info.filename} declares a {dtype} array of shape {shape} "
                                      f"in {info.file_size:,} bytes, not what this project writes: not read")
        header = archive.getinfo("header.npy")
        if header.file_size > MAX_HEADER_BYTES:
            raise UntrustedObject(f"{where}: a header of {header.file_size:,} bytes, more than an index's (at most "
                                  f"{MAX_HEADER_BYTES:,}): not read")


def _check_header(header: Any, where: str) -> dict[str, Any]:
    """The header if its fields have the types written here: classes a list of printable names, shards a list of
    names as `shard_key` makes them (relative, two parts: refused before any is read or written), shard_sizes one
    count per shard, left_out a list."""
    if not isinstance(header, dict) or header.pop("format", None) != FORMAT:
        raise ValueError(f"not a {FORMAT} index")
    classes, shards, sizes = header.get("classes"), header.get("shards"), header.get("shard_sizes")
    if not isinstance(classes, list) or not all(isinstance(c, str) and 0 < len(c) <= 255 and c.isprintable()
                                                for c in classes):
        raise UntrustedObject(f"{where}: its classes are not a list of class names")
    if not isinstance(shards, list):
        raise UntrustedObject(f"{where}: its shards are not a list of shard names")
    for name in shards:
        checked_name(name, where, parts=2)
    if not isinstance(sizes, list) or len(sizes) != len(shards) or not all(
            type(size) is int and 0 <= size <= MAX_SIZE for size in sizes):
        raise UntrustedObject(f"{where}: its shard_sizes are not a size for each of its {len(shards)} shards")
    if not isinstance(header.get("left_out"), list):
        raise UntrustedObject(f"{where}: its left_out is not a list")
    return header


def _check_columns(index: ShardIndex, where: str) -> None:
    """Every column has a value per sample, and each sample's shard, label, byte range (within its shard) and
    name (between two newlines of `names`) is within what the index holds."""
    count = len(index.label)
    if any(len(getattr(index, name)) != count for name in COLUMNS if name != "names"):
        raise UntrustedObject(f"{where}: its columns differ in length: not an index this project writes")
    problem = None
    if count:
        ends = index.name_ends
        if int(index.shard.max()) >= len(index.shards):
            problem = "a sample in a shard the index does not list"
        elif int(index.label.min()) < 0 or int(index.label.max()) >= len(index.classes):
            problem = "a label outside its classes"
        elif not _within_shards(index):
            problem = "a sample's bytes beyond the end of its shard"
        elif (ends[0] < 0 or int(ends[-1]) != len(index.names) or np.any(np.diff(ends) <= 0)
              or np.any(index.names[ends[:-1]] != ord("\n")) or _newlines(index.names) != count - 1):
            problem = "sample names that do not match their ends"
    elif len(index.names):
        problem = "sample names without samples"
    if problem:
        raise UntrustedObject(f"{where}: {problem}: not an index this project writes")


def _within_shards(index: ShardIndex) -> bool:
    """Every sample's bytes, [offset, offset + size), lie within its shard (in uint64, without wrapping)."""
    bounds = np.asarray(index.shard_sizes, dtype=np.uint64)[index.shard]
    offset = np.minimum(index.offset, bounds)
    return bool(np.all(index.offset == offset) and np.all(index.size <= bounds - offset))


def _newlines(names: np.ndarray, chunk: int = 64 * MiB) -> int:
    """The newlines in `names`, counted a chunk at a time (a comparison of ImageNet-21k's whole names at once
    would allocate ~0.4 GB)."""
    return sum(int(np.count_nonzero(names[start:start + chunk] == ord("\n")))
               for start in range(0, len(names), chunk))
