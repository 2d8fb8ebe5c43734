"""service/observe/step_metrics.py: what a run reports about its steps (issue 16), in process, against hand
computations: the collapse signal, the decimated correlation image (and its colours, service/observe/tensorboard.py),
the step clock's data wait, peak memory. A real run's lines and TensorBoard event files are
tests/e2e/test_observe.py's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.observe import step_metrics
from service.observe.step_metrics import (
    StepClock,
    correlation_magnitudes,
    decimated,
    embedding_std,
    feature_gram,
    peak_memory_gib,
    rankme,
    rankme_of_gram,
)
from service.observe.tensorboard import correlation_colors


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


def rankme_by_hand(features: np.ndarray, epsilon: float = 1e-7) -> float:
    """RankMe as the paper writes it (Garrido et al., ICML 2023, eq. 1), with numpy's SVD: p_k = sigma_k / ||sigma||_1
    + epsilon, RankMe = exp(-sum_k p_k log p_k)."""
    sigma = np.linalg.svd(features, compute_uv=False)
    p = sigma / np.abs(sigma).sum() + epsilon
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_is_the_papers_effective_rank_and_tells_full_from_dimensional_and_complete_collapse():
    generator = np.random.default_rng(0)
    spread = generator.standard_normal((2000, 64))
    low_rank = generator.standard_normal((2000, 8)) @ generator.standard_normal((8, 64))  # dimensional collapse
    collapsed = np.tile(generator.standard_normal((1, 64)), (2000, 1)) + 1e-6 * generator.standard_normal((2000, 64))
    ranks = {}
    for name, features in {"spread": spread, "low rank": low_rank, "collapsed": collapsed}.items():
        ranks[name] = rankme(torch.from_numpy(features).float())
        assert ranks[name] == pytest.approx(rankme_by_hand(features), rel=1e-4), name
    assert 0.9 * 64 < ranks["spread"] <= 64  # fills its space: near the dimension
    assert 4 < ranks["low rank"] <= 8 + 0.01  # at most the 8 directions it has
    assert ranks["collapsed"] < 1.1  # every sample in one direction
    few = rankme(torch.from_numpy(spread[:16]).float())
    assert few <= 16 + 0.01  # never more than the sample: the reason its size is logged
    assert rankme(torch.zeros(100, 64)) == 0.0  # dead features: no direction (the formula would divide by 0)


def test_rankme_of_the_gram_matrix_is_rankme_of_the_features_it_came_from():
    """The logged steps' form (the monitor off): F F^T travels, its eigenvalues are the squared singular values."""
    generator = np.random.default_rng(1)
    for features in (generator.standard_normal((300, 64)),
                     generator.standard_normal((300, 6)) @ generator.standard_normal((6, 64))):
        for rows in (200, 40):  # more rows than dimensions (F^T F), and fewer (F F^T)
            gram = feature_gram(torch.from_numpy(features).float(), rows=rows)
            assert gram.shape == (min(rows, 64),) * 2 and gram.dtype == torch.float64  # at most `rows` rows
            by_hand = rankme_by_hand(features[:rows].astype(np.float32).astype(np.float64))
            assert rankme_of_gram(gram) == pytest.approx(by_hand, rel=1e-6), rows
    assert rankme_of_gram(torch.zeros(10, 10)) == 0.0


def test_the_correlation_magnitudes_are_the_mean_absolute_diagonal_and_off_diagonal():
    c = np.array([[0.9, -0.2, 0.1], [0.3, -0.5, 0.0], [-0.1, 0.2, 1.0]])
    diagonal, off_diagonal = correlation_magnitudes(torch.from_numpy(c))
    assert diagonal.item() == pytest.approx((0.9 + 0.5 + 1.0) / 3)
    assert off_diagonal.item() == pytest.approx((0.2 + 0.1 + 0.3 + 0.0 + 0.1 + 0.2) / 6)
    identity = correlation_magnitudes(torch.eye(64))  # what Barlow Twins drives C to
    assert (identity[0].item(), identity[1].item()) == (1.0, 0.0)
