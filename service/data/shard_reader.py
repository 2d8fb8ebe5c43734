"""A packed split as a map-style data set: random access by global sample index, a batch's samples fetched
concurrently as byte ranges, every read checked against the index's CRC32.

Each loader process makes its own filesystem (an s3fs instance does not survive a fork: s3fs#914) with a
connection pool as large as the reads it has in flight (botocore's default pool of 10 would serialise them).
`__getitems__` is what torch's DataLoader calls with a whole batch's indices; a range that fails, or whose bytes
do not match the index (a truncated body), is fetched again with backoff, and after `storage.retries` more
attempts the error names the sample and its shard. fsspec's `cat_ranges`, never s3fs's `open()`: a file
object's read-ahead cache would fetch megabytes for each 110 KB image.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import time
import zlib
from collections.abc import Iterator

import fsspec
import PIL.Image
from fsspec.asyn import AsyncFileSystem
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.data.errors import SampleError
from service.data.shard_cache import ShardCache
from service.data.shards import INDEX, MAX_INDEX_BYTES, ShardIndex
from service.errors import DataError, StorageError
from service.spec import StorageSpec
from service.storage.filesystem import explain, filesystem, fsspec_options
from service.storage.untrusted import read_bounded

log = logging.getLogger("barlow")
CONCURRENCY = 64  # ranges in flight per loader process: ~40 ms a request, 64 in flight is ~1,600 images/s
CHUNK = 16  # samples decoded as soon as their chunk of the batch has arrived


def split_url(url: str, split: str) -> str:
    return f"{url.rstrip('/')}/{split}"


def read_index(url: str, storage: StorageSpec) -> ShardIndex:
    """The committed index of the split at `url`, read within MAX_INDEX_BYTES and checked (ShardIndex.from_bytes:
    UntrustedObject when it is not one this project writes); a clear error where there is none."""
    fs, path = filesystem(url, storage)
    try:
        data = read_bounded(fs, f"{path.rstrip('/')}/{INDEX}", MAX_INDEX_BYTES, "packed data set's index")
    except FileNotFoundError:
        raise DataError(f"{url}: no {INDEX} here, so no packed data set (a pack that did not finish has none): "
                        f"run barlow data pack SOURCE {url.rsplit('/', 1)[0]}") from None
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - credentials, endpoint, network: explained, not a traceback
        raise StorageError(explain(url, error)) from None
    return ShardIndex.from_bytes(data, f"{url}/{INDEX}")


def decode_image_bytes(data: bytes, what: str) -> tv_tensors.Image:
    """As datasets.decode_image_file, from bytes: PIL, converted to RGB."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return v2.functional.to_image(image.convert("RGB"))
    except (OSError, PIL.UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot decode image {what}: {error}") from None


class ShardedImages(Dataset):
    """(image, label) by global index from a packed split (service/data/shards.py)."""

    def __init__(self, url: str, storage: StorageSpec, *, cache: ShardCache | None = None,
                 concurrency: int = CONCURRENCY):
        self.url = url.rstrip("/")
        self.storage = storage
        self.index = read_index(self.url, storage)  # before the loader forks: its arrays are shared, not copied
        self.classes = self.index.classes
        self.cache = cache
        self.concurrency = concurrency
        self._fs: tuple[int, fsspec.AbstractFileSystem, str] | None = None
        self._pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def targets(self) -> list[int]:
        """Every label, as a new list: a list held here would be copied into every forked loader process as its
        reference counts change (ImageNet's 1.28M labels, ~46 MB each); the index's array is not."""
        return self.index.label.tolist()

    def sample_paths(self) -> list[str]:
        return self.index.all_names()

    def _filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._fs is None or self._fs[0] != os.getpid():
            options = fsspec_options(self.url, self.storage)
            options["skip_instance_cache"] = True  # never an instance made before this process forked
            if "config_kwargs" in options:  # S3: a pool for every read in flight; fetch() alone retries
                options["config_kwargs"] = {**options["config_kwargs"], "max_pool_connections": self.concurrency,
                                            "retries": {"total_max_attempts": 1}}
            fs, path = fsspec.core.url_to_fs(self.url, **options)
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs's own retry loop: off, so that storage.retries bounds the attempts
            self._fs = (os.getpid(), fs, path)
        return self._fs[1], self._fs[2]

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[tv_tensors.Image, int]]:
        samples = self.load_many(indices)
        for sample in samples:
            if isinstance(sample, SampleError):
                raise sample
        return samples  # type: ignore[return-value]  # no errors left

    def load_many(self, indices: list[int]) -> list[tuple[tv_tensors.Image, int] | SampleError]:
        """Every sample of `indices`, fetched concurrently; one whose bytes stay wrong (its CRC32) or that does not
        decode is its SampleError. A read that keeps failing (the network, the endpoint) raises StorageError."""
        chunks = [indices[start:start + CHUNK] for start in range(0, len(indices), CHUNK)]
        if len(chunks) > 1:  # every chunk's reads in flight at once; the first chunk decodes while the rest arrive
            fetches = [self._threads().submit(self.fetch, chunk) for chunk in chunks]
            fetched: Iterator[list[bytes | SampleError]] = (fetch.result() for fetch in fetches)
        else:
            fetched = iter([self.fetch(indices)])
        out: list[tuple[tv_tensors.Image, int] | SampleError] = []
        for chunk, datas in zip(chunks, fetched):
            for index, data in zip(chunk, datas):
                image = data if isinstance(data, SampleError) else self.decode(index, data)
                out.append(image if isinstance(image, SampleError) else (image, int(self.index.label[index])))
        return out

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None or self._pool[0] != os.getpid():  # threads do not survive a fork
            self._pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(self.concurrency // CHUNK))
        return self._pool[1]

    def describe(self, index: int) -> str:
        shard = self.index.shards[self.index.shard[index]]
        return f"{self.index.name(index)} (sample {index}, shard {self.url}/{shard})"

    def decode(self, index: int, data: bytes) -> tv_tensors.Image | SampleError:
        try:
            return decode_image_bytes(data, self.describe(index))
        except DataError as error:
            return SampleError(str(error), index, self.index.name(index))

    def fetch(self, indices: list[int]) -> list[bytes | SampleError]:
        """The checked bytes of every sample in `indices`: local shards from the cache, the rest as concurrent
        ranged reads, each failed or mismatching read retried with backoff."""
        out: dict[int, bytes | SampleError] = {}
        remote = []
        for position, index in enumerate(indices):
            local = self.cache.read(index) if self.cache is not None else None
            if local is not None and self._matches(index, local):
                out[position] = local
            else:
                remote.append(position)
        attempts = self.storage.retries + 1
        errors: dict[int, BaseException | bytes] = {}
        for attempt in range(attempts):
            if not remote:
                break
            if attempt:
                log.warning("%d of %d reads from %s failed (%s); retrying", len(remote), len(indices), self.url,
                            self._why(indices[remote[0]], errors[remote[0]]))
                time.sleep(min(0.2 * 2 ** (attempt - 1), 10.0))
            failed = []
            for position, result in zip(remote, self._read([indices[p] for p in remote])):
                if isinstance(result, bytes) and self._matches(indices[position], result):
                    out[position] = result
                    continue
                if isinstance(result, FileNotFoundError):  # a missing shard does not come back
                    raise StorageError(f"cannot read {self.describe(indices[position])}: the shard does not exist")
                errors[position] = result
                failed.append(position)
            remote = failed
        for position in remote:
            index, error = indices[position], errors[position]
            message = f"cannot read {self.describe(index)}: {self._why(index, error)} (after {attempts} attempts)"
            if isinstance(error, BaseException):  # the storage failed, not the sample: never skipped
                raise StorageError(message)
            out[position] = SampleError(message, index, self.index.name(index))  # stored bytes that are wrong
        return [out[p] for p in range(len(indices))]

    def _why(self, index: int, error: BaseException | bytes) -> str:
        if isinstance(error, BaseException):
            return explain(self.url, error).split(": ", 1)[-1]
        return (f"{len(error)} bytes with CRC32 {zlib.crc32(error):08x}, the index says {int(self.index.size[index])} "
                f"with {int(self.index.crc32[index]):08x}")

    def _read(self, indices: list[int]) -> list[bytes | BaseException]:
        """One concurrent ranged read per sample; a failed one is its exception."""
        fs, root = self._filesystem()
        paths = [f"{root}/{self.index.shards[self.index.shard[i]]}" for i in indices]
        starts = [int(self.index.offset[i]) for i in indices]
        ends = [start + int(self.index.size[i]) for start, i in zip(starts, indices)]
        batch = dict(batch_size=self.concurrency) if isinstance(fs, AsyncFileSystem) else {}
        return fs.cat_ranges(paths, starts, ends, on_error="return", **batch)

    def _matches(self, index: int, data: bytes) -> bool:
        return len(data) == int(self.index.size[index]) and zlib.crc32(data) == int(self.index.crc32[index])
