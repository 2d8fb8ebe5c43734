"""Packed data sets (service/data/pack.py, shards.py, shard_reader.py): what packing writes, what training and
evaluation read from it on S3 (the moto server, and behind a proxy that adds latency and faults), against the
ImageFolder the shards were packed from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits

from service.data.datasets import ImageFolder
from service.data.errors import DataError, SampleError
from service.data.loader import LoaderSettings, SkippedSamples, TwoViews, two_view_loader
from service.data.pack import PARTS, pack
from service.data.shard_cache import ShardCache
from service.data.shard_reader import ShardedImages, read_index
from service.data.shards import INDEX
from service.method.transforms import two_view_pipelines
from service.spec import AugmentSpec, StorageSpec
from service.storage.filesystem import StorageError, fsspec_options
from tests.support.s3_proxy import S3Proxy
from tests.support.s3_server import TEST_CREDENTIALS

ROOT = Path(__file__).resolve().parents[1]
BARLOW = str(Path(sys.executable).parent / "barlow")
IMAGES_PER_CLASS = 12


def write_digit_folder(root: Path, per_class: int = IMAGES_PER_CLASS, size: int = 16) -> Path:
    """An ImageFolder of real images: scikit-learn's digits as 16x16 PNGs (train/) and a few JPEGs (val/)."""
    digits = load_digits()
    counts: dict[int, int] = {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        n = counts.get(int(label), 0)
        if n >= per_class + 2:
            continue
        counts[int(label)] = n + 1
        split, suffix = ("train", "png") if n < per_class else ("val", "JPEG")
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = PIL.Image.fromarray((pixels * 255 / 16).astype("uint8")).resize((size, size)).convert("RGB")
        image.save(folder / f"{i:04d}.{suffix}")
    return root


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a PNG cut after its header: PIL cannot decode it


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
    """The folder packed onto moto S3 in small shards (about 6 per split), once for the module."""
    s3_server.create_bucket("packed")
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    pack(str(folder), "s3://packed/digits", storage, shard_bytes=30_000, processes=2, progress=False)
    return "s3://packed/digits", storage


def sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


# --- packing ---------------------------------------------------------------------------------------------------

def test_pack_writes_tar_shards_whose_members_are_the_source_files(folder, tmp_path):
    reports = pack(str(folder), str(tmp_path / "packed"), StorageSpec(), shard_bytes=30_000, processes=2,
                   progress=False)
    assert [r.split for r in reports] == ["train", "val"]
    source = ImageFolder(str(folder), "train")
    index = read_index(str(tmp_path / "packed" / "train"), StorageSpec())
    assert len(index) == len(source) == 10 * IMAGES_PER_CLASS and len(index.shards) > 2
    assert index.classes == source.classes and index.label.tolist() == source.targets
    assert len({key.split("/")[0] for key in index.shards}) > 1  # keys spread over prefixes
    for i, (path, label) in enumerate(source.samples):
        data = Path(path).read_bytes()
        assert index.name(i) == os.path.relpath(path, folder / "train")
        assert (int(index.size[i]), int(index.crc32[i])) == (len(data), zlib.crc32(data))
        shard = tmp_path / "packed" / "train" / index.shards[index.shard[i]]
        with open(shard, "rb") as file:
            file.seek(int(index.offset[i]))
            assert file.read(len(data)) == data
    with tarfile.open(tmp_path / "packed" / "train" / index.shards[0]) as tar:  # any tar reader: webdataset's keys
        names = tar.getnames()
        assert names[:2] == [index.name(0).lower(), index.name(0).rsplit(".", 1)[0] + ".cls"]
        assert tar.extractfile(names[1]).read() == str(source.targets[0]).encode()
    shards = [tmp_path / "packed" / "train" / key for key in index.shards]
    assert (tmp_path / "packed" / "train" / INDEX).stat().st_mtime_ns >= max(s.stat().st_mtime_ns for s in shards)
    assert not (tmp_path / "packed" / "train" / PARTS).exists()


def test_a_corrupt_image_is_listed_and_left_out(folder, tmp_path):
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folder), str(damaged)], check=True)
    bad = sorted((damaged / "train" / "digit3").iterdir())[1]
    corrupt(bad)
    result = subprocess.run([BARLOW, "data", "pack", str(damaged), str(tmp_path / "packed"), "--shard-mb", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"left out digit3/{bad.name}" in result.stdout and "1 left out" in result.stdout
    index = read_index(str(tmp_path / "packed" / "train"), StorageSpec())
    names = index.all_names()
    expected = [os.path.relpath(p, folder / "train") for p, _ in ImageFolder(str(folder), "train").samples]
    assert names == [n for n in expected if n != f"digit3/{bad.name}"]
    assert [item["name"] for item in index.meta["left_out"]] == [f"digit3/{bad.name}"]


def test_a_pack_killed_half_way_resumes_and_ends_as_an_uninterrupted_pack(folder, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pack(str(folder), str(whole), StorageSpec(), shard_bytes=20_000, processes=1, progress=False)
    command = [BARLOW, "data", "pack", str(folder), str(resumed), "--shard-mb", "0.02", "--processes", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    parts = resumed / "train" / PARTS
    deadline = time.monotonic() + 120
    while not (parts.exists() and len(list(parts.glob("*.json"))) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the packer and its process pool
    process.wait()
    assert not (resumed / "train" / INDEX).exists()  # nothing committed: training refuses it
    listing = subprocess.run([BARLOW, "data", "ls", str(resumed)], capture_output=True, text=True, timeout=60)
    assert "train: packing did not finish" in listing.stdout, listing.stdout + listing.stderr
    with pytest.raises(DataError, match="no index.npz"):
        ShardedImages(str(resumed / "train"), StorageSpec())
    done = len(list(parts.glob("*.json")))  # committed parts (a part being written has another name)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"({done} from an earlier pack)" in result.stdout.splitlines()[0]
    for split in ("train", "val"):
        assert (resumed / split / INDEX).read_bytes() == (whole / split / INDEX).read_bytes()
        index = read_index(str(whole / split), StorageSpec())
        for key in index.shards:
            assert (resumed / split / key).read_bytes() == (whole / split / key).read_bytes(), key


def test_packing_into_a_folder_that_holds_another_pack_is_refused(folder, tmp_path):
    pack("digits", str(tmp_path), StorageSpec(), shard_bytes=10**6, processes=1, progress=False)
    with pytest.raises(DataError, match="already holds another packed data set"):
        pack(str(folder), str(tmp_path), StorageSpec(), processes=1, progress=False)


# --- reading: the same samples as the folder, at any world size ------------------------------------------------

def test_samples_read_from_s3_are_the_folders_bytes_and_images(folder, packed_s3):
    url, storage = packed_s3
    shards, source = ShardedImages(f"{url}/train", storage), ImageFolder(str(folder), "train")
    indices = list(range(len(source)))[::-1]  # any order, across shards
    for index, data in zip(indices, shards.fetch(indices)):
        assert data == Path(source.samples[index][0]).read_bytes()
    for index, (image, label) in zip(indices, shards.__getitems__(indices)):
        expected, expected_label = source[index]
        assert torch.equal(image, expected) and label == expected_label
    assert shards.targets == source.targets and shards.classes == source.classes


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_workers_share_of_every_batch_equals_the_folders(folder, packed_s3, world_size):
    url, storage = packed_s3
    shards, source = ShardedImages(f"{url}/train", storage), ImageFolder(str(folder), "train")
    views = two_view_pipelines(AugmentSpec(), 16)
    for workers in (0, 1, 2):
        settings = LoaderSettings(workers=workers, prefetch=2 if workers else None, pin_memory=False)
        for rank in range(world_size):
            got, expected = [], []
            for images, out in ((shards, got), (source, expected)):
                loader, sampler = two_view_loader(images, views, global_batch=24, rank=rank, world_size=world_size,
                                                  seed=7, settings=settings)
                sampler.set_epoch(2)
                out.extend((sha(y1), sha(y2), replaced.tolist()) for y1, y2, replaced in loader)
            assert len(got) == len(source) // 24 and got == expected, (world_size, rank, workers)


def test_resuming_mid_epoch_on_fewer_workers_reads_what_an_uninterrupted_run_reads(packed_s3):
    """4 workers stop after 2 of the epoch's batches; 3 workers read the rest of that epoch and the next: each
    global batch (the workers' shares in rank order) equals the uninterrupted 4-worker run's."""
    url, storage = packed_s3
    shards = ShardedImages(f"{url}/train", storage)
    views = two_view_pipelines(AugmentSpec(), 16)
    settings = LoaderSettings(workers=1, prefetch=2, pin_memory=False)

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


@pytest.fixture
def proxied(packed_s3, s3_server):
    url, _ = packed_s3
    with S3Proxy(s3_server.endpoint_url, min_ms=20, max_ms=40) as proxy:
        storage = StorageSpec(endpoint_url=proxy.endpoint_url, retries=3,
                              options={"config_kwargs": {"read_timeout": 2, "connect_timeout": 2}})
        yield proxy, url, storage


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["slowdown", "reset", "truncate", "slow"])
def test_transient_faults_are_retried_and_every_sample_arrives_once(proxied, fault, barlow_log):
    proxy, url, storage = proxied
    clean = ShardedImages(f"{url}/train", StorageSpec(endpoint_url=storage.endpoint_url))
    indices = list(range(0, len(clean), 3))
    expected = clean.fetch(indices)
    shards = ShardedImages(f"{url}/train", storage)
    key = shards.index.shards[int(shards.index.shard[indices[0]])]
    proxy.add_fault(fault, match=key, times=2, seconds=5.0, fraction=0.5)
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


def test_bytes_that_differ_from_the_index_are_a_sample_error(folder, tmp_path):
    pack(str(folder), str(tmp_path), StorageSpec(), shard_bytes=10**6, processes=1, progress=False)
    shards = ShardedImages(str(tmp_path / "train"), StorageSpec(retries=1))
    path = tmp_path / "train" / shards.index.shards[0]
    data = bytearray(path.read_bytes())
    data[int(shards.index.offset[5]) + 30] ^= 0xFF  # one flipped byte in sample 5
    path.write_bytes(bytes(data))
    samples = shards.load_many([4, 5, 6])
    assert isinstance(samples[5 - 4], SampleError) and "CRC32" in str(samples[1]) and samples[1].index == 5
    assert not isinstance(samples[0], SampleError) and not isinstance(samples[2], SampleError)
    with pytest.raises(SampleError, match=rf"{shards.index.name(5)} \(sample 5"):
        shards[5]


# --- data.on_error ----------------------------------------------------------------------------------------------

def test_skip_substitutes_the_same_sample_at_any_world_size_and_fail_names_the_file(folder, tmp_path):
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folder), str(damaged)], check=True)
    images = ImageFolder(str(damaged), "train")
    bad = 17
    corrupt(Path(images.samples[bad][0]))
    views = two_view_pipelines(AugmentSpec(), 16)
    settings = LoaderSettings(workers=0, prefetch=None, pin_memory=False)
    epochs = {}
    for world_size in (1, 2):
        batches = []
        for rank in range(world_size):
            loader, sampler = two_view_loader(images, views, global_batch=24, rank=rank, world_size=world_size,
                                              seed=0, settings=settings, on_error="skip")
            sampler.set_epoch(0)
            batches.append(list(loader))
        epochs[world_size] = [(sha(torch.cat([b[s][0] for b in batches])), torch.cat([b[s][2] for b in batches]))
                              for s in range(len(batches[0]))]
    assert [h for h, _ in epochs[1]] == [h for h, _ in epochs[2]]
    replaced = torch.cat([r for _, r in epochs[1]])
    assert sorted(replaced[replaced >= 0].tolist()) == [bad]  # once, in the batch that drew it
    # the substitute is another sample's image with the bad slot's views: a function of (seed, epoch, index)
    twice = TwoViews(images, views, seed=0, on_error="skip")
    assert torch.equal(twice[(0, bad)][0], twice[(0, bad)][0]) and twice[(0, bad)][2] == bad
    with pytest.raises(SampleError, match=rf"cannot decode image .*{Path(images.samples[bad][0]).name}"):
        TwoViews(images, views, seed=0)[(0, bad)]


def test_more_skipped_samples_than_max_errors_fail_the_run(folder, tmp_path):
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folder), str(damaged)], check=True)
    images = ImageFolder(str(damaged), "train")
    for bad in (3, 40):
        corrupt(Path(images.samples[bad][0]))
    ledger = SkippedSamples(images, max_errors=1)
    ledger.add(torch.tensor([-1, 3, -1]))
    ledger.add(torch.tensor([3, -1]))  # the same sample again: still one
    assert ledger.count() == 1
    ledger.add(torch.tensor([-1, 40]))
    with pytest.raises(DataError, match="2 samples could not be read or decoded, more than data.max_errors=1"):
        ledger.count()


def train_command(spec_path: Path, output: Path, *settings: str) -> list[str]:
    return [BARLOW, "train", str(spec_path), "--set", f"run.output={output}",
            *(arg for setting in settings for arg in ("--set", setting))]


@pytest.fixture
def damaged_spec(folder, tmp_path):
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folder), str(damaged)], check=True)
    bad = Path(ImageFolder(str(damaged), "train").samples[30][0])
    corrupt(bad)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""data: {{dataset: imagefolder, path: {damaged}, image_size: 16, workers: 0}}
augment: {{blur: [0.0, 0.0]}}
model: {{backbone: resnet18, stem: cifar, projector: 64-64}}
optim: {{epochs: 2, batch_size: 30, warmup_epochs: 1}}
run: {{precision: fp32, log_every: 1}}
""")
    return spec, bad


@pytest.mark.slow
def test_a_run_that_skips_a_corrupt_image_completes_and_counts_it(damaged_spec, tmp_path):
    spec, bad = damaged_spec
    result = subprocess.run(train_command(spec, tmp_path / "skip", "data.on_error=skip"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("data.on_error=skip: another sample trains in place of") == 1, result.stderr[-3000:]
    assert f"{bad.parent.name}/{bad.name}" in result.stderr  # named, with the reason
    lines = [line for line in (tmp_path / "skip" / "stats.txt").read_text().splitlines()[1:] if '"loss"' in line]
    counts = [json.loads(line)["skipped"] for line in lines]
    assert counts[-1] == 1 and counts == sorted(counts)  # one distinct sample, over both epochs


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])  # 1: the error is met in a loader process and must arrive whole
def test_fail_names_the_file_and_a_rerun_fails_the_same_way(damaged_spec, tmp_path, workers):
    spec, bad = damaged_spec
    for attempt in range(2):
        result = subprocess.run(train_command(spec, tmp_path / "fail", f"data.workers={workers}"),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr[-3000:]
        assert bad.name in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith("barlow: cannot decode image "), result.stderr


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


def test_a_damaged_cached_shard_is_read_remotely_instead(folder, tmp_path):
    pack(str(folder), str(tmp_path / "packed"), StorageSpec(), shard_bytes=10**6, processes=1, progress=False)
    url = str(tmp_path / "packed" / "train")
    shards = ShardedImages(url, StorageSpec())
    shards.cache = ShardCache(str(tmp_path / "cache"), 10**9, url, shards.index, {})
    expected = shards.fetch([3])
    shards.cache._filler[1].join(30)
    local = shards.cache.local_path(0)
    local.write_bytes(bytes(len(local.read_bytes())))  # zeros: every CRC fails
    assert shards.fetch([3]) == expected


# --- evaluation and training read shards as they read the folder --------------------------------------------

def test_evaluation_from_shards_on_s3_equals_evaluation_from_the_folder(folder, packed_s3, tmp_path):
    from service.evaluation.evaluate import evaluate
    from service.method.model import build_backbone
    from service.spec import EvaluateSpec, load_spec

    url, storage = packed_s3
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
            spec = load_spec(None, [*data, "data.image_size=16", "data.workers=0", f"backbone.weights={weights}",
                                    "backbone.arch=resnet18", "backbone.stem=cifar", "eval.batch_size=32",
                                    f"run.output={tmp_path / name / mode[0]}", *mode], kind=EvaluateSpec)
            result = evaluate(spec, command="test")
            results.setdefault(name, []).append((result.train_images, result.acc1, result.acc5))
    assert results["shards"] == results["folder"]
    assert [images for images, _, _ in results["folder"]] == [10 * IMAGES_PER_CLASS, IMAGES_PER_CLASS]


@pytest.mark.slow
def test_training_from_shards_on_s3_equals_training_from_the_folder(folder, packed_s3, tmp_path):
    url, storage = packed_s3
    spec = tmp_path / "spec.yaml"
    spec.write_text("""data: {image_size: 16, workers: 1}
augment: {blur: [0.0, 0.0]}
model: {backbone: resnet18, stem: cifar, projector: 64-64}
optim: {epochs: 2, batch_size: 30, warmup_epochs: 1}
run: {precision: fp32, log_every: 1}
monitor: {knn_every_epochs: 1, knn_k: 20}
""")
    stats = {}
    for name, data in (("folder", ["data.dataset=imagefolder", f"data.path={folder}"]),
                       ("shards", ["data.dataset=shards", f"data.path={url}",
                                   f"storage.endpoint_url={storage.endpoint_url}"])):
        output = tmp_path / name
        result = subprocess.run(train_command(spec, output, *data), capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in (output / "stats.txt").read_text().splitlines()[1:]
                 if '"event"' not in line]
        stats[name] = [(line.get("loss"), line.get("knn_top1")) for line in lines]
    assert len(stats["folder"]) == 2 * 4 + 2 and stats["shards"] == stats["folder"]
