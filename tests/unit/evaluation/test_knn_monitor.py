"""service/evaluation/knn_monitor.py: after which epochs the kNN monitor runs."""

from __future__ import annotations

import pytest
import torch

from service.evaluation.knn_monitor import KnnMonitor
from service.runtime.distributed import Worker
from service.spec import load_spec
from tests.support.runs import DIGITS, ROOT


@pytest.mark.parametrize(("epochs", "every", "after"), [(5, 2, [1, 3, 4]), (4, 2, [1, 3]), (3, 1, [0, 1, 2]),
                                                        (3, None, [])])
def test_the_knn_monitor_runs_every_n_epochs_and_after_the_last(epochs, every, after):
    """After epochs N, 2N, ... (0-based: N - 1, ...) and the last, whether or not it is a multiple; null: never."""
    spec = load_spec(ROOT / DIGITS, [f"optim.epochs={epochs}", f"monitor.knn_every_epochs={every or 'null'}"])
    monitor = KnnMonitor(spec, Worker(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 0)
    assert [epoch for epoch in range(epochs) if monitor.due(epoch)] == after
