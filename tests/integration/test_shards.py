"""Packed data sets (service/data/pack.py, shards.py, shard_reader.py): what packing writes, what training and
evaluation read from it on S3 (the moto server, and behind a proxy that adds latency and faults), against the
ImageFolder the shards were packed from.

The folder is packed once for the module, onto S3 (`packed_s3`); the tests that read local shards read a download
of it (`packed_local`), and a test that damages shards damages a copy. What `barlow data pack` and training print,
and packing killed half-way: tests/e2e/test_shards.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import torch

from service.data.datasets import ImageFolder
from service.data.errors import SampleError
from service.data.loader import LoaderSettings, two_view_loader
from service.data.pack import PARTS, PLAN, pack
from service.data.shard_cache import ShardCache
from service.data.shard_reader import ShardedImages, read_index
from service.errors import DataError, StorageError
from service.method.transforms import two_view_pipelines
from service.spec import StorageSpec
from service.storage.filesystem import filesystem, fsspec_options
from tests.support.image_data import CROP_AND_FLIP, IMAGES_PER_CLASS, download, write_digit_folder
from tests.support.s3_proxy import S3Proxy
from tests.support.s3_server import TEST_CREDENTIALS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def credentials():
    """The test credentials in the environment for this module's tests (S3 filesystems read them there)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in TEST_CREDENTIALS.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def packed_s3(folder, s3_server, credentials):
    """The folder packed onto moto S3 by two processes in small shards (about 12 per split), once for the module:
    (url, storage, the pack's reports)."""
    s3_server.create_bucket("packed")
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    reports = pack(str(folder), "s3://packed/digits", storage, shard_bytes=20_000, processes=2, progress=False)
    return "s3://packed/digits", storage, reports


@pytest.fixture(scope="module")
def packed_local(packed_s3, tmp_path_factory):
    """A local copy of `packed_s3`, to read and to copy and damage (tests that damage it damage a copy)."""
    url, storage, _ = packed_s3
    fs, path = filesystem(url, storage)
    return download(fs, path, tmp_path_factory.mktemp("packed"))


def sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


# --- packing ---------------------------------------------------------------------------------------------------

def test_pack_writes_tar_shards_whose_members_are_the_source_files(folder, packed_s3):
    url, storage, reports = packed_s3
    assert [r.split for r in reports] == ["train", "val"] and [r.resumed_shards for r in reports] == [0, 0]
    fs, root = filesystem(url, storage)
    source = ImageFolder(str(folder), "train")
    index = read_index(f"{url}/train", storage)
    assert len(index) == len(source) == 10 * IMAGES_PER_CLASS and len(index.shards) > 2
    assert index.classes == source.classes and index.label.tolist() == source.targets
    assert len({key.split("/")[0] for key in index.shards}) > 1  # keys spread over prefixes
    shards = [fs.cat_file(f"{root}/train/{key}") for key in index.shards]
    assert [len(shard) for shard in shards] == list(index.shard_sizes)
    for i, (path, label) in enumerate(source.samples):
        data = Path(path).read_bytes()
        assert index.name(i) == os.path.relpath(path, folder / "train")
        assert (int(index.size[i]), int(index.crc32[i])) == (len(data), zlib.crc32(data))
        offset = int(index.offset[i])
        assert shards[int(index.shard[i])][offset:offset + len(data)] == data
    with tarfile.open(fileobj=io.BytesIO(shards[0])) as tar:  # any tar reader: webdataset's keys
        names = tar.getnames()
        assert names[:2] == [index.name(0).lower(), index.name(0).rsplit(".", 1)[0] + ".cls"]
        assert tar.extractfile(names[1]).read() == str(source.targets[0]).encode()
    assert not fs.exists(f"{root}/train/{PARTS}") and not fs.exists(f"{root}/train/{PLAN}")  # cleaned up at commit


def test_packing_into_a_folder_that_holds_another_pack_is_refused(packed_local):
    before = {path: path.read_bytes() for path in packed_local.rglob("*") if path.is_file()}
    with pytest.raises(DataError, match="already holds another packed data set"):
        pack("digits", str(packed_local), StorageSpec(), shard_bytes=10**6, processes=1, progress=False)
    assert {path: path.read_bytes() for path in packed_local.rglob("*") if path.is_file()} == before


# --- reading: the same samples as the folder, at any world size ------------------------------------------------

def test_samples_read_from_s3_are_the_folders_bytes_and_images(folder, packed_s3):
    url, storage, _ = packed_s3
    shards, source = ShardedImages(f"{url}/train", storage), ImageFolder(str(folder), "train")
    indices = list(range(len(source)))[::-1]  # any order, across shards
    for index, data in zip(indices, shards.fetch(indices)):
        assert data == Path(source.samples[index][0]).read_bytes()
    for index, (image, label) in zip(indices, shards.__getitems__(indices)):
        expected, expected_label = source[index]
        assert torch.equal(image, expected) and label == expected_label
    assert shards.targets == source.targets and shards.classes == source.classes


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_workers_share_of_every_batch_equals_the_folders(folder, packed_s3, world_size):
    """Each rank's share of each batch, read from S3 in the training process and by two loading processes (each
    its own S3 client, batches from alternate processes), equals the folder's read in the training process (that
    loading processes do not change a folder's batches: tests/integration/test_data.py). 1 worker: whole batches;
    3: shares of 8 of each batch of 24."""
    url, storage, _ = packed_s3
    shards, source = ShardedImages(f"{url}/train", storage), ImageFolder(str(folder), "train")
    views = two_view_pipelines(CROP_AND_FLIP, 16)

    def read(images, rank: int, workers: int) -> list[tuple[str, str, list[int]]]:
        settings = LoaderSettings(workers=workers, prefetch=2 if workers else None, pin_memory=False)
        loader, sampler = two_view_loader(images, views, global_batch=24, rank=rank, world_size=world_size, seed=7,
                                          settings=settings)
        sampler.set_epoch(2)
        return [(sha(y1), sha(y2), replaced.tolist()) for y1, y2, replaced in loader]

    for rank in range(world_size):
        expected = read(source, rank, workers=0)
        assert len(expected) == len(source) // 24
        for workers in (0, 2):
            assert read(shards, rank, workers) == expected, (world_size, rank, workers)


def test_resuming_mid_epoch_on_fewer_workers_reads_what_an_uninterrupted_run_reads(packed_s3):
    """4 workers stop after 2 of the epoch's batches; 3 workers read the rest of that epoch and the next: each
    global batch (the workers' shares in rank order) equals the uninterrupted 4-worker run's. Read in the training
    process: loading processes read what it reads (test_every_workers_share_of_every_batch_equals_the_folders)."""
    url, storage, _ = packed_s3
    shards = ShardedImages(f"{url}/train", storage)
    views = two_view_pipelines(CROP_AND_FLIP, 16)
    settings = LoaderSettings(workers=0, prefetch=None, pin_memory=False)

    def global_batches(world_size: int, epoch: int, start_batch: int) -> list[tuple[str, str]]:
        shares = []
        for rank in range(world_size):
            loader, sampler = two_view_loader(shards, views, global_batch=24, rank=rank, world_size=world_size,
                                              seed=3, settings=settings)
            sampler.set_epoch(epoch, start_batch=start_batch)
            shares.append(list(loader))
        return [(sha(torch.cat([s[b][0] for s in shares])), sha(torch.cat([s[b][1] for s in shares])))
                for b in range(len(shares[0]))]

    uninterrupted = global_batches(4, 0, 0) + global_batches(4, 1, 0)
    resumed = global_batches(3, 0, 2) + global_batches(3, 1, 0)
    assert len(uninterrupted) == 2 * (len(shards) // 24) and resumed == uninterrupted[2:]


# --- faults on the way: retried, never silently skipped or repeated, bounded in time --------------------------

@pytest.fixture
def barlow_log(caplog):
    """The service's log records (the CLI's tests may have stopped the logger's propagation)."""
    logger = logging.getLogger("barlow")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def proxy(s3_server):
    """One proxy process for the module; each test starts from its starting state (`proxied`)."""
    with S3Proxy(s3_server.endpoint_url, min_ms=20, max_ms=40) as started:
        yield started


@pytest.fixture
def proxied(proxy, packed_s3):
    """(the proxy without rules or statistics, the packed data set's URL, storage through the proxy with 3 retries
    and a read timeout of 1 s)."""
    url, _, _ = packed_s3
    proxy.reset()
    storage = StorageSpec(endpoint_url=proxy.endpoint_url, retries=3,
                          options={"config_kwargs": {"read_timeout": 1, "connect_timeout": 1}})
    return proxy, url, storage


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["slowdown", "reset", "truncate", "slow"])
def test_transient_faults_are_retried_and_every_sample_arrives_once(proxied, fault, barlow_log):
    proxy, url, storage = proxied
    clean = ShardedImages(f"{url}/train", StorageSpec(endpoint_url=storage.endpoint_url))
    indices = list(range(0, len(clean), 3))
    expected = clean.fetch(indices)
    shards = ShardedImages(f"{url}/train", storage)
    key = shards.index.shards[int(shards.index.shard[indices[0]])]
    # slow: twice the read timeout, so that each of the two slowed reads times out
    proxy.add_fault(fault, match=key, times=2, seconds=2.0, fraction=0.5)
    assert shards.fetch(indices) == expected  # each sample's bytes, once, in order
    assert proxy.stats()["faults"].get(fault) == 2
    if fault != "reset":  # aiohttp itself retries a request whose reused connection was reset, once
        assert "retrying" in barlow_log.text


@pytest.mark.timeout(120)
def test_a_fault_that_persists_is_a_clear_error_once_retries_are_spent(proxied):
    proxy, url, storage = proxied
    shards = ShardedImages(f"{url}/train", storage)
    key = shards.index.shards[0]
    proxy.add_fault("slowdown", match=key, times=None)
    with pytest.raises(StorageError, match=rf"cannot read .*shard {url}/train/{key}.*after 4 attempts"):
        shards.fetch([0])
    assert proxy.stats()["faults"]["slowdown"] == 4  # storage.retries + 1 requests, not s3fs's and botocore's too


def test_bytes_that_differ_from_the_index_are_a_sample_error(packed_local, tmp_path):
    shutil.copytree(packed_local / "train", tmp_path / "train")
    shards = ShardedImages(str(tmp_path / "train"), StorageSpec(retries=1))
    path = tmp_path / "train" / shards.index.shards[int(shards.index.shard[5])]
    data = bytearray(path.read_bytes())
    data[int(shards.index.offset[5]) + 30] ^= 0xFF  # one flipped byte in sample 5
    path.write_bytes(bytes(data))
    samples = shards.load_many([4, 5, 6])
    assert isinstance(samples[5 - 4], SampleError) and "CRC32" in str(samples[1]) and samples[1].index == 5
    assert not isinstance(samples[0], SampleError) and not isinstance(samples[2], SampleError)
    with pytest.raises(SampleError, match=rf"{shards.index.name(5)} \(sample 5"):
        shards[5]


# --- the node-local cache ---------------------------------------------------------------------------------------

def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_the_cache_fills_in_the_background_and_later_reads_are_local(proxied, tmp_path):
    proxy, url, storage = proxied
    shards = ShardedImages(f"{url}/train", storage)
    shards.cache = ShardCache(str(tmp_path), 10**9, f"{url}/train", shards.index, fsspec_options(url, storage))
    everything = list(range(len(shards)))
    first = shards.fetch(everything)  # remote, while the filler downloads the shards
    wait_for(lambda: all(shards.cache.local_path(n).exists() for n in range(len(shards.index.shards))))
    proxy.reset()
    assert shards.fetch(everything) == first
    assert proxy.stats()["requests"].get("GET", 0) == 0  # the second epoch reads nothing remotely


@pytest.mark.timeout(180)
def test_the_cache_stays_within_its_size_and_reads_the_rest_remotely(proxied, tmp_path):
    proxy, url, storage = proxied
    shards = ShardedImages(f"{url}/train", storage)
    budget = sum(sorted(shards.index.shard_sizes)[:2])  # room for about two shards
    shards.cache = ShardCache(str(tmp_path), budget, f"{url}/train", shards.index, fsspec_options(url, storage))
    everything = list(range(len(shards)))
    first = shards.fetch(everything)
    filler = shards.cache._filler[1]
    filler.join(60)
    assert not filler.is_alive()
    cached = [n for n in range(len(shards.index.shards)) if shards.cache.local_path(n).exists()]
    assert 1 <= len(cached) < len(shards.index.shards)
    assert sum(shards.index.shard_sizes[n] for n in cached) <= budget
    proxy.reset()
    assert shards.fetch(everything) == first
    remote = sum(1 for i in everything if int(shards.index.shard[i]) not in cached)
    assert proxy.stats()["requests"]["GET"] == remote  # one ranged read per sample of the uncached shards


def test_a_damaged_cached_shard_is_read_remotely_instead(packed_local, tmp_path):
    url = str(packed_local / "train")
    shards = ShardedImages(url, StorageSpec())
    shards.cache = ShardCache(str(tmp_path / "cache"), 10**9, url, shards.index, {})
    expected = shards.fetch([3])
    shards.cache._filler[1].join(30)
    local = shards.cache.local_path(int(shards.index.shard[3]))
    local.write_bytes(bytes(len(local.read_bytes())))  # zeros: every CRC fails
    assert shards.fetch([3]) == expected


# --- evaluation reads shards as it reads the folder -----------------------------------------------------------

def test_evaluation_from_shards_on_s3_equals_evaluation_from_the_folder(folder, packed_s3, tmp_path):
    from service.evaluation.evaluate import evaluate
    from service.method.model import build_backbone
    from service.spec import EvaluateSpec, load_spec

    url, storage, _ = packed_s3
    torch.manual_seed(1)
    weights = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18", "cifar").state_dict(), weights)
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(Path(p).name for p, _ in ImageFolder(str(folder), "train").samples[::10]))
    results = {}
    for name, data in (("folder", ["data.dataset=imagefolder", f"data.path={folder}"]),
                       ("shards", ["data.dataset=shards", f"data.path={url}",
                                   f"storage.endpoint_url={storage.endpoint_url}"])):
        for mode in (["eval.mode=knn"], ["eval.epochs=1", "data.train_percent=10", f"data.subset_list={subset}"]):
            spec = load_spec(None, [*data, "data.image_size=8", "data.workers=0", f"backbone.weights={weights}",
                                    "backbone.arch=resnet18", "backbone.stem=cifar", "eval.batch_size=32",
                                    f"run.output={tmp_path / name / mode[0]}", *mode], kind=EvaluateSpec)
            result = evaluate(spec, command="test")
            results.setdefault(name, []).append((result.train_images, result.acc1, result.acc5))
    assert results["shards"] == results["folder"]
    assert [images for images, _, _ in results["folder"]] == [10 * IMAGES_PER_CLASS, IMAGES_PER_CLASS]
