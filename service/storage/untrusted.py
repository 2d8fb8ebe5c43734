
"""Reading what others wrote: objects read with a size limit, JSON parsed without trusting its depth, and names
from stored objects checked before they become paths.

Whoever can write a run prefix, a data set or a checkpoint can write anything there: a 10 GB `stats.txt`, a
manifest of nested brackets, a shard named `../../etc/x`. Every read of such an object goes through here, and each
refusal is one line naming the object and what is wrong with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec

from service.errors import StorageError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# One part of a name this project writes: step-000000008, __0_0.distcp, .metadata, train-000017.tar, 3f.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*|\.metadata")


class UntrustedObject(StorageError):
    """A stored object is not what this project writes: too large, malformed, or naming a path outside its place."""


def read_bounded(fs: fsspec.AbstractFileSystem, path: str, limit: int, what: str) -> bytes:
    """The object at `path`, refused unread when it holds more than `limit` bytes (and never more read than that,
    should it grow while read)."""
    size = fs.size(path)
    if size is not None and size > limit:
        raise UntrustedObject(f"{path}: {size:,} bytes, more than a {what} holds (at most {limit:,}): not read")
    with fs.open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise UntrustedObject(f"{path}: more than a {what} holds (at most {limit:,} bytes): not read")
    return data


def parse_json(data: bytes, where: str) -> Any:
    """JSON from stored bytes; malformed text, bytes that are not UTF-8 and nesting deep enough to exhaust Python's
    stack are one UntrustedObject, not a traceback."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        kind = "nested too deeply" if isinstance(error, RecursionError) else f"not JSON ({error})"
        raise UntrustedObject(f"{where}: {kind}") from None


def checked_name(name: object, where: str, parts: int = 1) -> str:
    """`name` if it has the form of a name this project writes: at most `parts` '/'-separated parts, each of
    letters, digits, '.', '_' and '-' and none of them '.' or '..' (so nothing absolute, no parent, no backslash,
    no control character); UntrustedObject naming `where` and the name otherwise."""
    if not isinstance(name, str) or not 0 < len(name) <= 255:
        raise UntrustedObject(f"{where}: {name!r} is not a name this project writes")
    split = name.split("/")
    if len(split) > parts or not all(_PART.fullmatch(part) and part not in (".", "..") for part in split):
        raise UntrustedObject(f"{where}: {name!r} is not a name this project writes (a path? refused)")
    return name


def path_under(root: Path, name: str, where: str, parts: int = 1) -> Path:
    """`root / name` for a checked name, and only if it resolves (links followed) to a path under `root`."""
    path = (root / checked_name(name, where, parts)).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UntrustedObject(f"{where}: {name!r} leads outside {root}: refused")
    return path


def bounded_lines(fs: fsspec.AbstractFileSystem, path: str, limit: int, max_line: int, what: str
                  ) -> Iterator[bytes | None]:
    """The object's lines (without their newlines), streamed: None in place of a line longer than `max_line`
    bytes (never held whole); UntrustedObject, before anything is read, when it holds more than `limit` bytes (or
    once `limit` bytes are read, should it grow while read)."""
    size = fs.size(path)
    if size is not None and size > limit:
        raise UntrustedObject(f"{path}: {size:,} bytes, more than a {what} holds (at most {limit:,}): not read")
    with fs.open(path, "rb") as stream:
        chunks = iter(lambda: stream.read(MiB), b"")
        yield from split_lines(_at_most(chunks, limit, f"{path}: more than a {what} holds (at most {limit:,} bytes)"),
                               max_line)


def _at_most(chunks: Iterator[bytes], limit: int, message: str) -> Iterator[bytes]:
    read = 0
    for chunk in chunks:
        read += len(chunk)
        if read > limit:
            raise UntrustedObject(message)
        yield chunk


def split_lines(chunks: Iterable[bytes], max_line: int) -> Iterator[bytes | None]:
    """The lines of a stream of chunks, each None where it is longer than `max_line` bytes (its bytes dropped as
    they arrive, so a line without end holds no more than a chunk)."""
    pending, too_long = b"", False
    for chunk in chunks:
        *ended, rest = chunk.split(b"\n")
        for part in ended:
            yield None if too_long or len(pending) + len(part) > max_line else pending + part
            pending, too_long = b"", False
        too_long = too_long or len(pending) + len(rest) > max_line
        pending = b"" if too_long else pending + rest
    if pending or too_long:
        yield None if too_long else pending
