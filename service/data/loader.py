"""The world-size-independent batch sampler and the two-view loader, and the loader's size from the machine.

Every random choice of the augmentations is a function of (seed, epoch, sample index): a sample's two views are
the same whatever the rank, the number of workers or of loader processes. The sampler cuts each epoch's
permutation into global batches first and gives each rank a contiguous slice of every global batch, so a run
is the same computation at any world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from service.data.errors import SampleError
from service.data.seeds import Stream, derived_seed
from service.data.shard_reader import ShardedImages
from service.errors import DataError, SpecError, StorageError
from service.runtime.distributed import shard
from service.runtime.machine import Machine
from service.spec import DataSpec, EvalDataSpec

log = logging.getLogger("barlow")
MAX_AUTO_WORKERS = 16  # more processes than this add memory and start-up time faster than images per second


class LoadFailure:
    """A data error met in a loader process, carried to the training process whole: torch would re-raise it there
    as a new exception whose message is the worker's traceback (or as a RuntimeError when it cannot rebuild it)."""

    def __init__(self, error: DataError | StorageError):
        self.error = error


def collate(batch):
    """torch's default collation, passing a LoadFailure (a batch's, or any sample's) through."""
    if isinstance(batch, LoadFailure):
        return batch
    failure = next((item for item in batch if isinstance(item, LoadFailure)), None)
    return failure if failure is not None else default_collate(batch)


class CarryErrors(Dataset):
    """A map-style data set whose data errors become LoadFailures, for a loader built with `collate`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset has no __len__

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (DataError, StorageError) as error:
            return LoadFailure(error)


def checked(batches):
    """The batches of a loader built with `collate`; the first LoadFailure raises its error here."""
    for batch in batches:
        if isinstance(batch, LoadFailure):
            raise batch.error
        yield batch


def load_samples(images: Dataset, indices: list[int]) -> list[tuple[torch.Tensor, int] | SampleError]:
    """Each sample of `indices`, or the SampleError that says why it cannot be read: a packed data set fetches
    them all at once (`load_many`), the others one by one."""
    if isinstance(images, ShardedImages):
        return images.load_many(indices)
    out: list[tuple[torch.Tensor, int] | SampleError] = []
    for index in indices:
        try:
            out.append(images[index])
        except SampleError as error:
            out.append(error)
    return out


class TwoViews(Dataset):
    """Both augmented views of one sample, keyed by (epoch, index) and seeded by (seed, epoch, index), and the
    index of the sample a substitute stands in for (-1: none).

    `on_error="skip"`: a sample that cannot be read or decoded is replaced by another one drawn from
    (seed, epoch, index), the same whatever the world size or the loader processes; `fail` raises its error.
    """

    def __init__(self, images: Dataset, views: tuple[v2.Transform, v2.Transform], seed: int,
                 on_error: Literal["fail", "skip"] = "fail"):
        self.images = images
        self.views = views
        self.seed = seed
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]  # torch's Dataset has no __len__

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self._views_of([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, int]] | LoadFailure:
        try:
            return self._views_of(keys)
        except (DataError, StorageError) as error:
            return LoadFailure(error)

    def _views_of(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        epoch = keys[0][0]
        indices = [index for _, index in keys]
        samples = load_samples(self.images, indices)
        replaced = [-1] * len(keys)
        for position, sample in enumerate(samples):
            attempt = 0
            while isinstance(sample, SampleError):
                if self.on_error == "fail" or attempt == MAX_SUBSTITUTES:
                    raise sample
                if attempt == 0:
                    replaced[position] = indices[position]
                other = substitute(self.seed, epoch, indices[position], attempt, len(self))
                sample = load_samples(self.images, [other])[0]
                attempt += 1
            samples[position] = sample
        return [(*self.two_views(epoch, index, sample[0]), bad)  # type: ignore[index]
                for (_, index), sample, bad in zip(keys, samples, replaced)]

    def two_views(self, epoch: int, index: int, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(Stream.SAMPLE_VIEWS, self.seed, epoch, index))
            return self.views[0](image).as_subclass(torch.Tensor), self.views[1](image).as_subclass(torch.Tensor)


MAX_SUBSTITUTES = 16  # substitutes tried for one bad sample before its error is raised (a substitute may be bad too)


def substitute(seed: int, epoch: int, index: int, attempt: int, size: int) -> int:
    """The sample that stands in for a bad `index`: another one, a function of (seed, epoch, index, attempt)."""
    return (index + 1 + derived_seed(Stream.SUBSTITUTE, seed, epoch, index, attempt) % (size - 1)) % size


class SkippedSamples:
    """The distinct samples this run skipped (data.on_error=skip), over every worker, against data.max_errors.
    Each is logged once by the worker that first meets it, with the reason read again here (the loader
    processes only mark the substitution)."""

    def __init__(self, images: Dataset, max_errors: int):
        self.images = images
        self.max_errors = max_errors
        self.mine: set[int] = set()
        self.everyone: set[int] = set()

    def add(self, replaced: torch.Tensor) -> None:
        """A batch's substitution column (a CPU tensor from the loader: reading it does not wait for the device)."""
        if not bool((replaced >= 0).any()):
            return
        for index in sorted(set(replaced[replaced >= 0].tolist()) - self.mine):
            error = load_samples(self.images, [index])[0]  # read again here for its reason: a few bytes, once
            reason = error if isinstance(error, SampleError) else "it could not be read by the loader"
            log.warning("data.on_error=skip: another sample trains in place of sample %d: %s", index, reason)
            self.mine.add(index)

    def count(self) -> int:
        """The distinct skipped samples of every worker, checked against the limit: at logged steps only (it
        gathers from every worker)."""
        gathered: list[set[int]] = [self.mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [set() for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, self.mine)
        self.everyone.update(*gathered)
        if len(self.everyone) > self.max_errors:
            raise DataError(f"{len(self.everyone)} samples could not be read or decoded, more than data.max_errors="
                            f"{self.max_errors}: the data set is damaged (the log names each); repair it or raise "
                            "data.max_errors")
        return len(self.everyone)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch as (epoch, index) keys.

    The epoch's permutation depends only on (seed, epoch); it is cut into `len(self)` global batches (the
    incomplete last one is dropped, so every step normalises over exactly `global_batch` samples), and rank r
    takes the r-th of `world_size` contiguous slices of each, whose sizes differ by at most one when the batch
    does not divide evenly. The loss and BatchNorm use global-batch statistics, so uneven shares compute exactly
    what even ones do: a run keeps its global batch at any world size. `start_batch` skips the batches already
    trained in this epoch.
    """

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch < world_size:
            raise ValueError(f"global batch {global_batch} is smaller than the {world_size} workers")
        if dataset_size < global_batch:
            raise DataError(
                f"the data set has {dataset_size} samples, fewer than one global batch ({global_batch}): "
                f"lower optim.batch_size"
            )
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.share = shard(global_batch, rank, world_size)
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.dataset_size // self.global_batch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derived_seed(Stream.BATCH_ORDER, self.seed, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        for batch in range(self.start_batch, self.dataset_size // self.global_batch):
            start = batch * self.global_batch
            yield [(self.epoch, index) for index in order[start + self.share.start:start + self.share.stop]]


@dataclass(frozen=True)
class LoaderSettings:
    """How one training worker's DataLoader runs: loading processes, batches each prepares ahead, pinned memory."""

    workers: int
    prefetch: int | None  # None without loading processes
    pin_memory: bool

    @classmethod
    def choose(cls, spec: DataSpec | EvalDataSpec, batch_bytes: int, local_workers: int, cuda: bool,
               machine: Machine | None = None) -> LoaderSettings:
        """`auto` fields sized from the machine shared by the node's `local_workers` training workers.

        Loading processes hand their batches over through /dev/shm (64 MB by default in a container): every batch
        in flight sits there, so more processes or prefetched batches than it holds crash the run with a bus error.
        """
        machine = machine or Machine.current()
        shared = machine.shared_memory // local_workers  # 0: not measurable (no /dev/shm), not limiting
        workers: int
        if spec.workers == "auto":
            workers = max(0, min(MAX_AUTO_WORKERS, int(machine.cpus / local_workers) - 1))
            if shared and workers * batch_bytes > shared // 4:
                fitting = int(shared // 4 // batch_bytes)
                log.warning("data.workers=auto: /dev/shm has room for %d loading process(es), not %d; give the "
                            "pod more shared memory (TorchX shmMB, docker --shm-size)", fitting, workers)
                workers = fitting
        else:
            workers = spec.workers
            if shared and workers * batch_bytes > shared:
                raise SpecError(
                    f"data.workers={workers}: each loading process keeps a batch of {batch_bytes / 2**20:.0f} MB in "
                    f"/dev/shm, and {shared / 2**20:.0f} MB is free per training worker. Give the pod more shared "
                    "memory (TorchX shmMB, docker --shm-size), or lower data.workers or the batch"
                )
        prefetch: int | None = None
        if workers:
            wanted: int | Literal["auto"] = spec.prefetch
            if wanted == "auto":
                room = min(shared // 4 if shared else machine.memory, machine.memory // 8 // local_workers)
                prefetch = max(1, min(4, int(room // (workers * batch_bytes))))
            else:
                prefetch = wanted
        return cls(workers=workers, prefetch=prefetch, pin_memory=cuda)

    def loader_options(self, persistent: bool = True) -> dict:
        """DataLoader's arguments. Persistent processes keep their copy of the data set: only for data sets whose
        state does not change between epochs."""
        return dict(num_workers=self.workers, prefetch_factor=self.prefetch, pin_memory=self.pin_memory,
                    persistent_workers=persistent and self.workers > 0, worker_init_fn=leave_the_trainers_process_group)


def leave_the_trainers_process_group(worker_id: int) -> None:
    """Signals meant for a run go to its process group: the image's tini (-g) forwards a pod's SIGTERM to the whole
    group, and torchrun ends a worker with killpg. A loader process in that group would die with it before the
    training process's checkpoint (a DataLoader whose process dies fails the run). In a group of its own it is
    stopped by the training process's DataLoader when that one exits, or ends by itself within seconds (DataLoader's
    watchdog) when that one is killed outright."""
    os.setpgid(0, 0)


def two_view_loader(
    images: Dataset,
    views: tuple[v2.Transform, v2.Transform],
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    settings: LoaderSettings,
    on_error: Literal["fail", "skip"] = "fail",
) -> tuple[DataLoader, GlobalBatchSampler]:
    """Batches of (view 1, view 2, the index each substitute replaces or -1) for this rank."""
    size = len(images)  # type: ignore[arg-type]  # torch's Dataset has no __len__
    sampler = GlobalBatchSampler(size, global_batch, rank, world_size, seed)
    loader = DataLoader(TwoViews(images, views, seed, on_error), batch_sampler=sampler, collate_fn=collate,
                        **settings.loader_options())
    return loader, sampler


class Transformed(Dataset):
    """(image, label) pairs of a labelled data set, restricted to `indices`, through `transform`.

    With a `seed`, a random transform is seeded by (seed, epoch, index) as the pretraining views are: an image's
    crop is the same whichever rank or loader process draws it. Call set_epoch before iterating each epoch.
    """

    def __init__(self, images: Dataset, transform: v2.Transform, indices: list[int] | None = None,
                 seed: int | None = None):
        self.images = images
        self.transform = transform
        self.indices = (list(range(len(images)))  # type: ignore[arg-type]  # torch's Dataset has no __len__
                        if indices is None else list(indices))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[self.indices[index]]
        if self.seed is None:
            return self.transform(image).as_subclass(torch.Tensor), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(Stream.SAMPLE_VIEWS, self.seed, self.epoch, self.indices[index]))
            return self.transform(image).as_subclass(torch.Tensor), label
