"""service/evaluation/probes.py: top-k, the weighted kNN and the linear probe against hand computations, and the
benchmarks' kNN defaults. Short real runs of the reference's protocols: tests/integration/test_evaluate.py."""

import inspect
import math

import pytest
import torch

from service.evaluation.probes import knn_accuracy, knn_scores, linear_accuracy, topk_correct


def test_topk_counts_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 1])
    # row 0: best 1, then 2 (hit at k=2); row 1: best 0 (hit); row 2: best 2, then 1 (hit at k=2)
    assert topk_correct(scores, labels, ks=(1, 2, 3)) == [1, 3, 3]
    assert topk_correct(scores, labels, ks=(1, 5)) == [1, 3]  # k beyond the classes: every row


def test_weighted_knn_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    cosine = [1 / math.hypot(1, 0.1), 0.1 / math.hypot(1, 0.1), 1.1 / (math.hypot(1, 0.1) * math.sqrt(2))]
    scores = knn_scores(bank, labels, query, num_classes=2, k=2, temperature=0.1)
    # the two nearest are bank 0 (class 0) and bank 2 (class 1); bank 1 does not vote
    expected = torch.tensor([[math.exp(cosine[0] / 0.1), math.exp(cosine[2] / 0.1)]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    all_vote = knn_scores(bank, labels, query, num_classes=2, k=3, temperature=0.1)
    assert float(all_vote[0, 1]) == pytest.approx(float(expected[0, 1]) + math.exp(cosine[1] / 0.1), rel=1e-5)


def test_linear_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    assert linear_accuracy((x[:100], y[:100]), (x[100:], y[100:])) > 0.95


def test_the_probes_default_to_the_benchmarks_weighted_knn():
    """`barlow compare` and the few-shot probe call them with their defaults: k=200, T=0.1."""
    for probe in (knn_scores, knn_accuracy):
        parameters = inspect.signature(probe).parameters
        assert (parameters["k"].default, parameters["temperature"].default) == (200, 0.1), probe.__name__
