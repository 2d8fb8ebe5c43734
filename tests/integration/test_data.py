"""The two-view loader with real loading processes: the same batches as loading in the training process."""

import os
import signal
import subprocess
import sys

import torch

from service.data.datasets import Digits
from service.data.loader import LoaderSettings, two_view_loader
from service.method.transforms import two_view_pipelines
from tests.support.image_data import CROP_AND_FLIP
from tests.support.runs import ROOT


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


LOADER_UNDER_SIGTERM = """
import signal, sys, time
from torch.utils.data import DataLoader
from service.data.loader import LoaderSettings

stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))  # as the trainer does: finish, checkpoint, stop
settings = LoaderSettings(workers=2, prefetch=1, pin_memory=False)
batches = iter(DataLoader(list(range(16)), batch_size=2, **settings.loader_options()))
seen = [next(batches).tolist(), next(batches).tolist()]  # one from each loader process: both are set up
print("ready", flush=True)
while not stopping:
    time.sleep(0.01)
seen += [batch.tolist() for batch in batches]
print(seen, flush=True)
"""


def test_sigterm_to_the_process_group_leaves_the_loader_processes_to_the_training_process():
    """tini -g forwards a pod's SIGTERM to the whole process group, torchrun ends a worker with killpg: the loader
    processes must not die of it before the training process's checkpoint, and the process must still exit."""
    process = subprocess.Popen([sys.executable, "-c", LOADER_UNDER_SIGTERM], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        os.killpg(process.pid, signal.SIGTERM)  # the training process and its loader processes alike
        out, err = process.communicate(timeout=60)  # a loader process that outlived its exit would hang here
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert out.strip() == str([[2 * i, 2 * i + 1] for i in range(8)])  # every batch arrived, in order

