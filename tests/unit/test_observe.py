"""What a run reports about itself (issue 16), in process: the stats lines' new fields against hand computations,
and when the kNN monitor runs. A real run's lines and its TensorBoard event files are tests/e2e/test_observe.py's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.evaluation.knn_monitor import KnnMonitor
from service.method.loss import barlow_twins_terms
from service.method.model import BarlowTwins
from service.method.optim import build_lars
from service.observe import step_metrics
from service.observe.step_metrics import StepClock, decimated, embedding_std, peak_memory_gib
from service.observe.tensorboard import correlation_colors
from service.runtime.distributed import Worker
from service.runtime.precision import Precision
from service.spec import LossSpec, ModelSpec, load_spec
from service.train.step import training_step
from tests.support.runs import DIGITS, ROOT

# --- the measurements, by hand ---

def test_the_loss_terms_are_the_papers_two_sums_and_add_up_to_the_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    terms = barlow_twins_terms(z1, z2)
    # an independent computation: standardise each view over the batch (biased, as BatchNorm), then C = n1^T n2 / N
    a, b = z1.numpy(), z2.numpy()
    n1 = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    n2 = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = n1.T @ n2 / len(a)
    assert terms.on_diag.item() == pytest.approx(((1 - np.diag(c)) ** 2).sum(), rel=1e-9)
    assert terms.off_diag.item() == pytest.approx((c ** 2).sum() - (np.diag(c) ** 2).sum(), rel=1e-9)

    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="32-32"))
    optimizer = build_lars(model, 1e-6, 0.9, 0.001)
    precision = Precision.choose("fp32", torch.device("cpu"))
    spec = LossSpec(lambd=0.01, scale_loss=0.5)
    output = training_step(model, optimizer, precision.grad_scaler(), precision, spec,
                           torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), observe=True)
    assert (output.on_diag + output.off_diag).item() == pytest.approx(output.loss.item(), rel=1e-6)
    assert output.correlation is not None and output.correlation.shape == (32, 32)
    # the step's terms are those of its correlation matrix, scaled as the loss is (lambd on the off-diagonal)
    c = output.correlation.double()
    assert output.on_diag.item() == pytest.approx(0.5 * ((1 - c.diagonal()) ** 2).sum().item(), rel=1e-5)
    assert output.off_diag.item() == pytest.approx(
        0.5 * 0.01 * ((c ** 2).sum() - (c.diagonal() ** 2).sum()).item(), rel=1e-5)


def test_the_collapse_signal_is_one_over_root_d_when_spread_and_zero_when_collapsed():
    torch.manual_seed(0)
    for dim in (64, 256, 1024):
        spread = embedding_std(torch.randn(4096, dim))
        assert spread.item() == pytest.approx(1 / math.sqrt(dim), rel=0.03)
    one_point = torch.randn(1, 256).repeat(512, 1) + 1e-6 * torch.randn(512, 256)
    assert embedding_std(one_point).item() < 1e-4
    # scaling an embedding does not change it: it is measured on the sphere
    z = torch.randn(512, 128)
    assert embedding_std(7 * z).item() == pytest.approx(embedding_std(z).item(), rel=1e-5)


def test_the_image_keeps_the_diagonal_and_maps_minus_one_zero_one_to_blue_white_red():
    matrix = torch.eye(256) * 0.9 + 0.01
    small = decimated(matrix)
    assert small.shape == (64, 64)
    assert torch.allclose(small.diagonal(), torch.full((64,), 0.91))  # averaging would leave ~0.02 there
    assert small[0, 1].item() == pytest.approx(0.01)
    assert decimated(torch.zeros(10, 10)).shape == (10, 10)
    colors = correlation_colors(np.array([[-1.0, 0.0, 1.0, 5.0]]))
    assert colors.dtype == np.uint8 and colors.shape == (1, 4, 3)
    assert colors[0].tolist() == [[59, 76, 192], [255, 255, 255], [180, 4, 38], [180, 4, 38]]


def test_the_clock_splits_wall_time_into_steps_and_data_wait(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(step_metrics.time, "perf_counter", lambda: now[0])

    def slow_batches():
        for batch in range(3):
            now[0] += 0.5  # the loader takes 0.5 s per batch
            yield batch

    clock = StepClock()
    for _ in clock.timed(slow_batches()):
        now[0] += 1.5  # the step itself
        clock.step_done()
    step_time, data_wait = clock.read()
    assert step_time == pytest.approx(2.0)
    assert data_wait == pytest.approx(0.25)
    now[0] += 4.0  # e.g. the kNN monitor
    clock.restart()
    now[0] += 1.0
    clock.step_done()
    assert clock.read() == (pytest.approx(1.0), pytest.approx(0.0))


def test_peak_memory_on_the_cpu_covers_what_the_process_held():
    held = torch.ones(2**28 // 4 * 3)  # 0.75 GiB of float32, touched
    assert float(held[-1]) == 1.0
    assert peak_memory_gib(torch.device("cpu")) >= 0.75


@pytest.mark.parametrize(("epochs", "every", "after"), [(5, 2, [1, 3, 4]), (4, 2, [1, 3]), (3, 1, [0, 1, 2]),
                                                        (3, None, [])])
def test_the_knn_monitor_runs_every_n_epochs_and_after_the_last(epochs, every, after):
    """After epochs N, 2N, ... (0-based: N - 1, ...) and the last, whether or not it is a multiple; null: never."""
    spec = load_spec(ROOT / DIGITS, [f"optim.epochs={epochs}", f"monitor.knn_every_epochs={every or 'null'}"])
    monitor = KnnMonitor(spec, Worker(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 0)
    assert [epoch for epoch in range(epochs) if monitor.due(epoch)] == after
