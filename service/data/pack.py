"""`barlow data pack SOURCE DEST`: an ImageFolder (train/ and val/, or one flat folder of class folders) or the
built-in digits, packed into tar shards and an index at any fsspec URL (format: service/data/shards.py).

Every image is decoded once here, so a corrupt one is reported and left out before any GPU is booked. The work
is planned first (samples in the ImageFolder's order, cut into shards by file size); processes then pack whole
shards, each committing its part of the index after its shard (`_parts/`). A pack that stopped half-way
continues from the shards it committed; the index, the split's commit, is written last.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torchvision
from tqdm import tqdm

from service.data.datasets import digits_is_test, regular_image_file
from service.data.shards import INDEX, MAX_INDEX_BYTES, ShardIndex, shard_key
from service.errors import DataError
from service.spec import StorageSpec
from service.storage.filesystem import filesystem, is_remote
from service.storage.untrusted import KiB, UntrustedObject, parse_json, read_bounded

PLAN = "_plan.json"
PARTS = "_parts"
HEADER_BYTES = 1536  # a sample's two tar headers and its padding, on average: for planning shard sizes
MAX_PLAN_BYTES = 64 * KiB  # {"plan": sha256, "source": the source's path}


@dataclass(frozen=True)
class Source:
    """One sample to pack: its name in the data set (the path below the split's folder), label and file."""

    name: str
    label: int
    path: str  # a file, or "digits:<n>" for the built-in digits
    size: int


def _split_sources(source: str) -> dict[str, tuple[list[str], list[Source]]]:
    """{split: (classes, samples in the ImageFolder's order)} of a folder or of the digits."""
    if source == "digits":
        return _digits()
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"{source}: not a folder (an ImageFolder with train/ and val/, or one folder of class "
                        "folders) and not `digits`")
    splits = [split for split in ("train", "val") if (root / split).is_dir()]
    folders = {split: root / split for split in splits} or {"train": root}
    out = {}
    for split, folder in folders.items():
        classes, class_to_index = torchvision.datasets.folder.find_classes(str(folder))
        samples = torchvision.datasets.folder.make_dataset(str(folder), class_to_index,
                                                            is_valid_file=regular_image_file)
        out[split] = (classes, [Source(os.path.relpath(path, folder), label, path, os.path.getsize(path))
                                for path, label in samples])
    return out


def _digits() -> dict[str, tuple[list[str], list[Source]]]:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    out: dict[str, tuple[list[str], list[Source]]] = {}
    for split, test in (("train", False), ("val", True)):
        chosen = [i for i in range(len(targets)) if digits_is_test(i) == test]
        out[split] = ([str(c) for c in range(10)],
                      [Source(f"{targets[i]}/{i:04d}.png", int(targets[i]), f"digits:{i}", 100) for i in chosen])
    return out


@functools.cache
def _digit_images():
    from sklearn.datasets import load_digits

    return load_digits().images


def _encoded(source: Source) -> bytes:
    if source.path.startswith("digits:"):  # the 8x8 pixels (0-16) as 8-bit grey, losslessly
        pixels = (_digit_images()[int(source.path.split(":")[1])] * 255 / 16).round().astype("uint8")
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        return buffer.getvalue()
    with open(source.path, "rb") as file:
        return file.read()


def _check_decodes(data: bytes) -> str | None:
    """Why the image cannot be decoded as training will decode it (PIL, to RGB), or None."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").load()
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _plan_shards(samples: list[Source], shard_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) runs of samples of about `shard_bytes` each."""
    cuts, start, filled = [], 0, 0
    for position, sample in enumerate(samples):
        filled += sample.size + HEADER_BYTES
        if filled >= shard_bytes:
            cuts.append((start, position + 1))
            start, filled = position + 1, 0
    if start < len(samples):
        cuts.append((start, len(samples)))
    return cuts


def _parent_made(fs, path: str, dest: str) -> str:
    """`path`, its folder made first on a local filesystem (object stores have no folders)."""
    if not is_remote(dest):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _write_whole(fs, path: str, body: bytes, dest: str) -> None:
    """Write `path` so that a reader never sees part of it: an object store's PUT is, a local file is renamed into
    place (a pack killed while writing leaves no half part behind)."""
    if is_remote(dest):
        fs.pipe_file(path, body)
        return
    partial = f"{path}.partial-{os.getpid()}"
    fs.pipe_file(partial, body)
    os.replace(partial, path)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # no time, owner or group: packing twice gives equal bytes
    return info


def _pack_shard(dest: str, storage: StorageSpec, split: str, number: int, samples: list[Source],
                plan: str) -> dict:
    """Write one shard, then its part of the index; returns the part."""
    fs, root = filesystem(dest, storage)
    key = shard_key(split, number)
    records, left_out = [], []
    with fs.open(_parent_made(fs, f"{root}/{split}/{key}", dest), "wb") as stream, \
            tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            try:
                data = _encoded(sample)
            except OSError as error:
                left_out.append(dict(name=sample.name, error=f"{type(error).__name__}: {error}"))
                continue
            if (why := _check_decodes(data)) is not None:
                left_out.append(dict(name=sample.name, error=why))
                continue
            stem, extension = os.path.splitext(sample.name)
            member = _member(f"{stem}{extension.lower()}", len(data))
            offset = tar.offset + len(member.tobuf(tar.format, tar.encoding, tar.errors))
            tar.addfile(member, io.BytesIO(data))
            label = str(sample.label).encode()
            tar.addfile(_member(f"{stem}.cls", len(label)), io.BytesIO(label))
            records.append(dict(name=sample.name, label=sample.label, offset=offset, size=len(data),
                                crc32=zlib.crc32(data)))
    part = dict(plan=plan, number=number, key=key, size=fs.size(f"{root}/{split}/{key}"), samples=records,
                left_out=left_out)
    _write_whole(fs, _parent_made(fs, f"{root}/{split}/{PARTS}/{number:06d}.json", dest), json.dumps(part).encode(),
                 dest)
    return part


@dataclass
class PackReport:
    split: str
    index: ShardIndex
    resumed_shards: int  # shards a previous pack had committed


def pack(source: str, dest: str, storage: StorageSpec, *, shard_bytes: int = 512 << 20,
         processes: int | None = None, progress: bool = True) -> list[PackReport]:
    """Pack every split of `source` under `dest/<split>/`; each report lists the images left out."""
    processes = processes or max(1, (os.cpu_count() or 1))
    reports = []
    fs, root = filesystem(dest, storage)
    for split, (classes, samples) in _split_sources(source).items():
        cuts = _plan_shards(samples, shard_bytes)
        plan = hashlib.sha256(json.dumps(dict(  # what the shards hold, not how the source was named
            shard_bytes=shard_bytes, classes=classes,
            samples=[(s.name, s.label, s.size) for s in samples], cuts=cuts)).encode()).hexdigest()
        split_root = f"{root}/{split}"
        if fs.exists(f"{split_root}/{INDEX}"):
            done = ShardIndex.from_bytes(read_bounded(fs, f"{split_root}/{INDEX}", MAX_INDEX_BYTES,
                                                      "packed data set's index"), f"{dest}/{split}/{INDEX}")
            if done.meta.get("plan") != plan:
                raise DataError(f"{dest}/{split} already holds another packed data set: remove it, or pack into "
                                "another URL")
            reports.append(PackReport(split, done, len(done.shards)))  # packed already: nothing to do
            continue
        if fs.exists(f"{split_root}/{PLAN}"):
            found = parse_json(read_bounded(fs, f"{split_root}/{PLAN}", MAX_PLAN_BYTES, "pack's plan"),
                               f"{dest}/{split}/{PLAN}")
            if not isinstance(found, dict) or found.get("plan") != plan:
                raise DataError(f"{dest}/{split} holds a pack of another source or shard size: remove it, or pack "
                                "into another URL")
        else:
            body = json.dumps(dict(plan=plan, source=source)).encode()
            fs.pipe_file(_parent_made(fs, f"{split_root}/{PLAN}", dest), body)
        parts = {}
        for path in (fs.glob(f"{split_root}/{PARTS}/*.json") if fs.exists(f"{split_root}/{PARTS}") else []):
            part = parse_json(read_bounded(fs, path, MAX_INDEX_BYTES, "pack's part"), path)
            if _is_part(part, split, plan, len(cuts)):
                parts[part["number"]] = part
        resumed = len(parts)
        todo = [n for n in range(len(cuts)) if n not in parts]
        bar = tqdm(total=len(samples), desc=f"packing {split}", unit="img", disable=not progress,
                   initial=sum(cuts[n][1] - cuts[n][0] for n in parts))
        if todo:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding s3fs's event loop
            with concurrent.futures.ProcessPoolExecutor(min(processes, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(_pack_shard, dest, storage, split, n, samples[cuts[n][0]:cuts[n][1]], plan): n
                           for n in todo}
                for future in concurrent.futures.as_completed(futures):
                    n = futures[future]
                    parts[n] = future.result()
                    bar.update(cuts[n][1] - cuts[n][0])
        bar.close()
        try:
            body = _index(classes, [parts[n] for n in range(len(cuts))], source, plan).to_bytes()
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # a part's records of other types
            raise UntrustedObject(f"{dest}/{split}/{PARTS}: a part is not of the form this project writes "
                                  f"({error}): remove the folder and pack again") from None
        index = ShardIndex.from_bytes(body, f"{dest}/{split}/{INDEX}")  # checked before it is committed
        _write_whole(fs, f"{split_root}/{INDEX}", body, dest)  # the commit
        if fs.exists(f"{split_root}/{PARTS}"):
            fs.rm(f"{split_root}/{PARTS}", recursive=True)
        fs.rm_file(f"{split_root}/{PLAN}")
        reports.append(PackReport(split, index, resumed))
    return reports


def _is_part(part: Any, split: str, plan: str, shards: int) -> bool:
    """Whether a committed part belongs to this plan and names the shard `shard_key` makes for its number: a part
    naming another (a path) is not this pack's, and its shard is packed again."""
    return (isinstance(part, dict) and part.get("plan") == plan and type(part.get("number")) is int
            and 0 <= part["number"] < shards and part.get("key") == shard_key(split, part["number"]))


def _index(classes: list[str], parts: list[dict], source: str, plan: str) -> ShardIndex:
    samples = [dict(record, shard=number) for number, part in enumerate(parts) for record in part["samples"]]
    left_out = [item for part in parts for item in part["left_out"]]
    return ShardIndex.build(classes, [p["key"] for p in parts], [p["size"] for p in parts], samples,
                            meta=dict(source=source, plan=plan, left_out=left_out))
