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
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

INDEX = "index.npz"
FORMAT = "barlow-shards/1"
PREFIXES = 256


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
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                header = json.loads(bytes(arrays["header"]).decode())
                if header.pop("format", None) != FORMAT:
                    raise ValueError(f"not a {FORMAT} index")
                columns = {name: arrays[name] for name in ("shard", "offset", "size", "label", "crc32", "names",
                                                            "name_ends")}
        except (ValueError, KeyError, OSError, zlib.error) as error:
            raise ValueError(f"{where} is not a packed data set's index ({error}): pack it with barlow data pack"
                             ) from None
        return cls(classes=header.pop("classes"), shards=header.pop("shards"),
                   shard_sizes=header.pop("shard_sizes"), meta=header, digest=hashlib.sha256(data).hexdigest(),
                   **columns)

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
