"""data.on_error over an ImageFolder with corrupt images, in the training process: `skip` substitutes the same
sample at any world size and counts each distinct sample once; `fail` names the file. Shards: tests/integration and
tests/e2e test_shards.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from service.data.datasets import ImageFolder
from service.data.errors import SampleError
from service.data.loader import LoaderSettings, SkippedSamples, TwoViews, two_view_loader
from service.errors import DataError
from service.method.transforms import two_view_pipelines
from tests.support.image_data import CROP_AND_FLIP, damaged_copy, write_digit_folder


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
