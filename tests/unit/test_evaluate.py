"""Evaluation's parts: the probes against hand computations, subsets, the spec's defaults per mode, the frozen
backbone's check. Short real runs of the reference's protocols: tests/integration/test_evaluate.py."""

import inspect
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.data.datasets import ImageFolder
from service.data.subsets import balanced_indices, indices_from_list, read_subset_list
from service.errors import DataError, SpecError
from service.evaluation.evaluate import BackboneChanged, _check_unchanged, backbone_state
from service.evaluation.probes import knn_accuracy, knn_scores, linear_accuracy, topk_correct
from service.method.model import build_backbone
from service.runtime.distributed import shard
from service.spec import EvaluateSpec, StorageSpec, load_spec


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


def test_shards_cover_every_item_once():
    for count in (0, 1, 7, 10, 359):
        for world in (1, 2, 3, 4):
            items = [i for rank in range(world) for i in shard(count, rank, world)]
            assert items == list(range(count))


def test_balanced_subset_is_deterministic_and_balanced():
    targets = [c for c in range(5) for _ in range(40 + 10 * c)]  # 40, 50, ..., 80 images per class
    ten = balanced_indices(targets, 10, seed=3)
    assert ten == balanced_indices(targets, 10, seed=3)
    assert ten != balanced_indices(targets, 10, seed=4)
    assert ten == sorted(set(ten))
    per_class = [sum(targets[i] == c for i in ten) for c in range(5)]
    assert per_class == [4, 5, 6, 7, 8]
    assert all(sum(targets[i] == c for i in balanced_indices(targets, 1, seed=0)) == 1 for c in range(5))


def image_tree(root: Path) -> Path:
    for cls in ("n01440764", "n01443537"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "train" / cls / f"{cls}_{i}.JPEG")
    return root


def test_subset_from_a_simclr_list_on_any_fsspec_location(tmp_path):
    images = ImageFolder(str(image_tree(tmp_path)), "train")
    listing = "memory://lists/1percent.txt"
    import fsspec

    fsspec.filesystem("memory").pipe_file("/lists/1percent.txt", b"n01443537_2.JPEG\nn01440764_0.JPEG\n\n")
    names = read_subset_list(listing, StorageSpec())
    chosen = indices_from_list([path for path, _ in images.samples], names, listing)
    assert chosen == indices_from_list([path for path, _ in images.samples], names[::-1], listing)
    assert sorted(Path(images.samples[i][0]).name for i in chosen) == ["n01440764_0.JPEG", "n01443537_2.JPEG"]
    assert [images.samples[i][1] for i in chosen] == [0, 1]
    with pytest.raises(DataError, match="1 of the 2 images"):
        indices_from_list([path for path, _ in images.samples], ["n01440764_0.JPEG", "n09999999_1.JPEG"], listing)
    with pytest.raises(DataError, match="does not exist"):
        read_subset_list("memory://lists/none.txt", StorageSpec())


def test_evaluation_spec_defaults_are_the_reference_per_mode():
    linear = load_spec(None, ["data.dataset=digits"], kind=EvaluateSpec).eval
    assert (linear.epochs, linear.batch_size, linear.lr_classifier, linear.lr_backbone, linear.weight_decay,
            linear.momentum) == (100, 256, 0.3, 0.0, 1e-6, 0.9)
    finetune = load_spec(None, ["data.dataset=digits", "eval.mode=finetune"], kind=EvaluateSpec).eval
    assert (finetune.epochs, finetune.lr_classifier, finetune.lr_backbone, finetune.weight_decay) == (20, 0.5, 0.005, 0)
    with pytest.raises(SpecError, match="freezes the backbone"):
        load_spec(None, ["data.dataset=digits", "eval.lr_backbone=0.1"], kind=EvaluateSpec)
    with pytest.raises(SpecError, match="did you mean 'train_percent'"):
        load_spec(None, ["data.dataset=digits", "data.train_procent=10"], kind=EvaluateSpec)


def test_a_changed_frozen_backbone_is_caught():
    network = build_backbone("resnet18", "cifar")
    reference = backbone_state(network)
    _check_unchanged(reference, network)
    network.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(BackboneChanged, match="layer1.0.bn1.running_mean"):
        _check_unchanged(reference, network)


def test_the_probes_default_to_the_benchmarks_weighted_knn():
    """`barlow compare` and the few-shot probe call them with their defaults: k=200, T=0.1."""
    for probe in (knn_scores, knn_accuracy):
        parameters = inspect.signature(probe).parameters
        assert (parameters["k"].default, parameters["temperature"].default) == (200, 0.1), probe.__name__
