"""A node-local cache of whole shards (`data.cache`), filled in the background, bounded in size.

Every epoch reads every shard uniformly at random, so evicting would only trade one remote read for another: the
cache fills until its budget is spent and then keeps what it holds; the rest stays remote. Each loader process on
the node runs one filler thread; a shard is claimed by creating its `.claim` file exclusively (a claim whose
process died is taken over), downloaded to a temporary name and renamed, so a reader sees a whole shard or none.
The folder is keyed by the index's digest: a data set packed again never reads the old one's shards.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import fsspec

from service.data.shards import INDEX, ShardIndex
from service.storage.untrusted import path_under

log = logging.getLogger("barlow")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    def __init__(self, folder: str, max_bytes: int, url: str, index: ShardIndex, options: dict):
        self.root = Path(folder) / index.digest[:16]
        self.max_bytes = max_bytes
        self.url = url
        self.options = options  # the data set's fsspec options
        self.index = index
        # the index's shard names are checked names (ShardIndex.from_bytes); their paths must also resolve, links
        # followed, under the cache's folder: nothing is read or written outside it
        self.paths = [path_under(self.root, name, f"{url}/{INDEX}", parts=2) for name in index.shards]
        self._filler: tuple[int, threading.Thread] | None = None
        self._open: dict[int, int] = {}  # shard -> file descriptor, in this process

    def local_path(self, shard: int) -> Path:
        return self.paths[shard]

    def read(self, sample: int) -> bytes | None:
        """The sample's bytes from a cached shard, or None (not cached yet); starts this process's filler."""
        self._start_filler()
        index = self.index
        shard = int(index.shard[sample])
        descriptor = self._open.get(shard)
        if descriptor is None:
            try:
                descriptor = os.open(self.local_path(shard), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._open[shard] = descriptor
        return os.pread(descriptor, int(index.size[sample]), int(index.offset[sample]))

    def used_bytes(self) -> int:
        """Bytes held or claimed: every shard whose file or claim exists."""
        return sum(size for shard, size in enumerate(self.index.shard_sizes)
                   if self.local_path(shard).exists() or self._claim(shard).exists())

    def _claim(self, shard: int) -> Path:
        return self.local_path(shard).with_suffix(".claim")

    def _start_filler(self) -> None:
        if self._filler is None or self._filler[0] != os.getpid():
            self._open = {}  # descriptors do not cross a fork cleanly: reopen
            thread = threading.Thread(target=self._fill, name="shard-cache", daemon=True)
            self._filler = (os.getpid(), thread)
            thread.start()

    def _fill(self) -> None:
        """Download every shard that nobody holds or claims while the budget lasts, starting at a shard chosen
        by this process so that the node's fillers do not queue on the same claims."""
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **{**self.options, "skip_instance_cache": True})
            count = len(self.index.shards)
            first = os.getpid() % count if count else 0
            for shard in [(first + n) % count for n in range(count)]:
                if self.local_path(shard).exists():
                    continue
                if self.used_bytes() + self.index.shard_sizes[shard] > self.max_bytes:
                    continue
                if not self._take_claim(shard):
                    continue
                try:
                    partial = self.local_path(shard).with_suffix(f".part-{os.getpid()}")
                    fs.get_file(f"{root}/{self.index.shards[shard]}", str(partial))
                    if partial.stat().st_size != self.index.shard_sizes[shard]:
                        partial.unlink()
                        raise OSError("the downloaded shard has the wrong size")
                    os.replace(partial, self.local_path(shard))
                finally:
                    self._claim(shard).unlink(missing_ok=True)
        except Exception as error:  # noqa: BLE001 - the cache only speeds reads up: reads stay remote without it
            log.warning("the shard cache under %s stopped filling: %s", self.root, error)

    def _take_claim(self, shard: int) -> bool:
        claim = self._claim(shard)
        claim.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = int(claim.read_text() or 0)
                except (OSError, ValueError):
                    return False
                if not holder or _alive(holder):  # empty: its creator is writing its pid now
                    return False
                claim.unlink(missing_ok=True)  # its process died: take it over
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(str(os.getpid()))
            return True
        return False
