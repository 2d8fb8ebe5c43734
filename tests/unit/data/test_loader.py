"""service/data/loader.py: the sampler and the views: the same global batches and the same views whatever the world
size; the loader's settings; data.on_error over an ImageFolder with corrupt images, in the training process: `skip`
substitutes the same sample at any world size and counts each distinct sample once, `fail` names the file.

That loader processes deliver the same batches: tests/integration/test_data.py. Shards: tests/integration and
tests/e2e test_shards.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from service.data.datasets import Digits, ImageFolder
from service.data.errors import SampleError
from service.data.loader import GlobalBatchSampler, LoaderSettings, SkippedSamples, TwoViews, two_view_loader
from service.errors import DataError, SpecError
from service.method.transforms import two_view_pipelines
from service.runtime.machine import Machine
from service.spec import AugmentSpec, DataSpec
from tests.support.image_data import CROP_AND_FLIP, damaged_copy, write_digit_folder


def global_batches(size: int, batch: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches as the union of every rank's shares, in rank order."""
    shares = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, rank, world, seed)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    return [[index for rank in range(world) for _, index in shares[rank][b]] for b in range(len(shares[0]))]


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
def test_global_batches_do_not_depend_on_world_size(world):
    assert global_batches(100, 16, world, seed=3, epoch=5) == global_batches(100, 16, 1, seed=3, epoch=5)


def test_uneven_shares_differ_by_at_most_one():
    sizes = [len(next(iter(GlobalBatchSampler(100, 16, rank, 5, seed=0)))) for rank in range(5)]
    assert sum(sizes) == 16 and max(sizes) - min(sizes) == 1


def test_epoch_is_a_permutation_without_repeats_and_drops_the_incomplete_batch():
    batches = global_batches(100, 16, 2, seed=0, epoch=0)
    flat = [index for batch in batches for index in batch]
    assert len(batches) == 6 and all(len(batch) == 16 for batch in batches)
    assert len(set(flat)) == 96 and set(flat) <= set(range(100))


def test_epochs_and_seeds_reorder():
    assert global_batches(64, 8, 1, 0, 0) != global_batches(64, 8, 1, 0, 1)
    assert global_batches(64, 8, 1, 0, 0) != global_batches(64, 8, 1, 1, 0)


def test_start_batch_skips_exactly_the_trained_batches():
    sampler = GlobalBatchSampler(100, 16, 1, 2, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=4)
    assert list(sampler) == full[4:] and len(sampler) == 2


def test_keys_carry_the_epoch():
    sampler = GlobalBatchSampler(32, 8, 0, 1, seed=0)
    sampler.set_epoch(7)
    assert {epoch for batch in sampler for epoch, _ in batch} == {7}


def test_dataset_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(DataError, match="lower optim.batch_size"):
        GlobalBatchSampler(10, 16, 0, 1, seed=0)


def make_views(seed=0):
    images = Digits(16)
    return images, TwoViews(images, two_view_pipelines(AugmentSpec(blur=(0.5, 0.5)), 16), seed)


def test_views_are_a_function_of_seed_epoch_and_index():
    _, views = make_views()
    first = views[(3, 10)]
    torch.manual_seed(1234)  # the global RNG state must not matter
    again = views[(3, 10)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])  # two different views
    assert not torch.equal(views[(4, 10)][0], first[0])  # another epoch, other views
    assert not torch.equal(make_views(seed=1)[1][(3, 10)][0], first[0])


def test_views_leave_the_global_rng_alone():
    _, views = make_views()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    views[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


MB = 2**20
BIG = Machine(cpus=64.0, memory=512 * 1024 * MB, shared_memory=256 * 1024 * MB)


def test_auto_loader_shares_the_cores_among_the_nodes_workers():
    settings = LoaderSettings.choose(DataSpec(), batch_bytes=300 * MB, local_workers=8, cuda=True, machine=BIG)
    # 64 / 8 cores, one for training; 3 batches of each of 7 processes (6.2 GB) fit in an eighth of the memory (8 GB)
    assert settings == LoaderSettings(workers=7, prefetch=3, pin_memory=True)
    one = LoaderSettings.choose(DataSpec(), batch_bytes=MB, local_workers=1, cuda=False, machine=BIG)
    assert one.workers == 16 and not one.pin_memory  # capped
    laptop = Machine(cpus=2.0, memory=8 * 1024 * MB, shared_memory=4 * 1024 * MB)
    assert LoaderSettings.choose(DataSpec(), batch_bytes=MB, local_workers=1, cuda=False, machine=laptop).workers == 1
    single_core = Machine(cpus=1.0, memory=8 * 1024 * MB, shared_memory=4 * 1024 * MB)
    assert LoaderSettings.choose(DataSpec(), batch_bytes=MB, local_workers=1, cuda=False,
                                 machine=single_core) == LoaderSettings(workers=0, prefetch=None, pin_memory=False)


def test_auto_loader_fits_the_shared_memory():
    small_shm = Machine(cpus=64.0, memory=512 * 1024 * MB, shared_memory=8 * 1024 * MB)  # 1 GB per training worker
    settings = LoaderSettings.choose(DataSpec(), batch_bytes=100 * MB, local_workers=8, cuda=True, machine=small_shm)
    assert settings.workers == 2  # a quarter of 1 GB holds two 100 MB batches
    assert settings.workers * settings.prefetch * 100 * MB <= 1024 * MB
    roomy = LoaderSettings.choose(DataSpec(), batch_bytes=100 * MB, local_workers=8, cuda=True, machine=BIG)
    assert roomy.workers == 7 and roomy.prefetch == 4


def test_explicit_settings_are_kept_and_an_impossible_one_is_refused():
    spec = DataSpec(workers=3, prefetch=2)
    assert LoaderSettings.choose(spec, batch_bytes=MB, local_workers=1, cuda=False,
                                 machine=BIG) == LoaderSettings(workers=3, prefetch=2, pin_memory=False)
    tiny_shm = Machine(cpus=64.0, memory=512 * 1024 * MB, shared_memory=64 * MB)  # a container's default /dev/shm
    with pytest.raises(SpecError, match="shared memory"):
        LoaderSettings.choose(DataSpec(workers=8), batch_bytes=300 * MB, local_workers=1, cuda=True, machine=tiny_shm)
    assert LoaderSettings.choose(DataSpec(workers=0), batch_bytes=300 * MB, local_workers=1, cuda=True,
                                 machine=tiny_shm).workers == 0


def test_auto_loader_for_the_imagenet_recipe_on_the_components_default_pod():
    """8 GPUs with the TorchX component's defaults per GPU (10 cores, 80 GB, 8 GB of /dev/shm), 256 images per GPU
    shipped as uint8 (colour on the device): the numbers bench/README.md quotes."""
    pod = Machine(cpus=80.0, memory=8 * 80 * 1024 * MB, shared_memory=8 * 8 * 1024 * MB)
    settings = LoaderSettings.choose(DataSpec(), batch_bytes=2 * 256 * 3 * 224 * 224, local_workers=8, cuda=True,
                                     machine=pod)
    assert settings == LoaderSettings(workers=9, prefetch=3, pin_memory=True)


# ---- data.on_error over an ImageFolder with corrupt images ----

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two 8 px training images of each digit: 20, in 5 global batches of 4."""
    return write_digit_folder(tmp_path_factory.mktemp("folder"), per_class=2, size=8)


def sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_skip_substitutes_the_same_sample_at_any_world_size_and_fail_names_the_file(folder, tmp_path):
    bad = 17
    damaged_copy(folder, tmp_path / "damaged", bad)
    images = ImageFolder(str(tmp_path / "damaged"), "train")
    views = two_view_pipelines(CROP_AND_FLIP, 8)
    settings = LoaderSettings(workers=0, prefetch=None, pin_memory=False)
    epochs = {}
    for world_size in (1, 2):
        batches = []
        for rank in range(world_size):
            loader, sampler = two_view_loader(images, views, global_batch=4, rank=rank, world_size=world_size,
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
    damaged_copy(folder, tmp_path / "damaged", 3, 13)
    images = ImageFolder(str(tmp_path / "damaged"), "train")
    ledger = SkippedSamples(images, max_errors=1)
    ledger.add(torch.tensor([-1, 3, -1]))
    ledger.add(torch.tensor([3, -1]))  # the same sample again: still one
    assert ledger.count() == 1
    ledger.add(torch.tensor([-1, 13]))
    with pytest.raises(DataError, match="2 samples could not be read or decoded, more than data.max_errors=1"):
        ledger.count()
