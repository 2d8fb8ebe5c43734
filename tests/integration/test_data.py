"""The two-view loader with real loading processes: the same batches as loading in the training process."""

import torch

from service.data.datasets import Digits
from service.data.loader import LoaderSettings, two_view_loader
from service.method.transforms import two_view_pipelines
from tests.support.image_data import CROP_AND_FLIP


def test_loader_processes_do_not_change_the_batches():
    """Two processes, so that consecutive batches come from different processes and must be put back in order."""
    images = Digits(8)
    pipelines = two_view_pipelines(CROP_AND_FLIP, 8)
    batches = {}
    for workers in (0, 2):
        settings = LoaderSettings(workers=workers, prefetch=2 if workers else None, pin_memory=False)
        loader, sampler = two_view_loader(images, pipelines, global_batch=32, rank=1, world_size=2, seed=0,
                                          settings=settings)
        sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == len(images) // 32
    for (a1, a2, _), (b1, b2, _) in zip(batches[0], batches[2]):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert a1.shape == (16, 3, 8, 8)


def test_a_loader_process_leaves_sigterm_to_the_training_process():
    """SIGTERM sent to a whole container reaches the loader processes too: they let the first pass, and the training
    process (which checkpoints on it) stops them itself; a second one, as a shutdown sends, ends them."""
    import os
    import signal

    from torch.utils.data import DataLoader

    from service.data.loader import LoaderSettings

    settings = LoaderSettings(workers=1, prefetch=2, pin_memory=False)
    loader = DataLoader(list(range(8)), batch_size=2, **settings.loader_options())
    batches = iter(loader)
    next(batches)
    (process,) = batches._workers  # the loader process
    os.kill(process.pid, signal.SIGTERM)
    assert [batch.tolist() for batch in batches] == [[2, 3], [4, 5], [6, 7]]  # nothing died: every batch arrives
    os.kill(process.pid, signal.SIGTERM)  # a second one (a shutdown's terminate) ends it
    process.join(timeout=10)
    assert not process.is_alive()
