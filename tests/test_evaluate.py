"""Evaluation: the probes against hand computations, subsets, and short real runs of the reference's protocols."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.data.datasets import ImageFolder
from service.data.errors import DataError
from service.data.subsets import balanced_indices, indices_from_list, read_subset_list
from service.evaluation.evaluate import BackboneChanged, _check_unchanged, backbone_state, evaluate
from service.evaluation.probes import knn_scores, linear_accuracy, topk_correct
from service.method.model import build_backbone
from service.runtime.distributed import shard
from service.spec import EvaluateSpec, SpecError, StorageSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory) -> Path:
    """An exported-format backbone: a randomly initialised CIFAR-stem ResNet-18 without fc."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(build_backbone("resnet18", "cifar").state_dict(), path)
    return path


def digits_eval(weights: Path, output: Path, *overrides: str) -> EvaluateSpec:
    return load_spec(ROOT / "specs" / "digits-linear.yaml", [
        f"backbone.weights={weights}", f"run.output={output}", "eval.epochs=2", *overrides], kind=EvaluateSpec)


def stats_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "stats.txt").read_text().splitlines() if line.startswith("{")]


def test_linear_probe_trains_only_fc_and_keeps_the_backbone_bit_identical(random_backbone, tmp_path):
    result = evaluate(digits_eval(random_backbone, tmp_path), command="test")
    loaded = torch.load(random_backbone, weights_only=True)
    classifier = torch.load(tmp_path / "classifier.pth", weights_only=True)
    assert set(classifier) == set(loaded) | {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(classifier[key], value), key  # weights and BatchNorm statistics
    assert classifier["fc.bias"].abs().sum() > 0  # trained from its zero initialisation
    assert 15 < result.acc1 <= 100 and result.acc5 >= result.acc1  # above chance (10%) after 2 epochs
    epochs = [line for line in stats_of(tmp_path) if "acc1" in line]
    assert [line["epoch"] for line in epochs] == [0, 1]
    assert set(epochs[0]) == {"epoch", "acc1", "acc5", "best_acc1", "best_acc5", "time"}
    assert epochs[-1]["best_acc1"] == max(line["acc1"] for line in epochs)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["acc1"] == result.acc1 and saved["train_images"] == 1078


def test_a_changed_frozen_backbone_is_caught(random_backbone):
    network = build_backbone("resnet18", "cifar")
    network.load_state_dict(torch.load(random_backbone, weights_only=True))
    reference = backbone_state(network)
    _check_unchanged(reference, network)
    network.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(BackboneChanged, match="layer1.0.bn1.running_mean"):
        _check_unchanged(reference, network)


def test_finetune_changes_the_backbone_on_a_balanced_subset(random_backbone, tmp_path):
    result = evaluate(digits_eval(random_backbone, tmp_path, "eval.mode=finetune", "eval.epochs=1",
                                  "data.train_percent=10"), command="test")
    from collections import Counter

    from service.data.datasets import Digits

    per_class = Counter(Digits(16, train=True).targets).values()
    assert result.train_images == sum(round(count / 10) for count in per_class)  # 10% of every class
    loaded = torch.load(random_backbone, weights_only=True)
    classifier = torch.load(tmp_path / "classifier.pth", weights_only=True)
    changed = [key for key, value in loaded.items() if not torch.equal(classifier[key], value)]
    assert "conv1.weight" in changed and "layer4.1.bn2.weight" in changed  # from the stem to the last block


def test_rerun_resumes_the_finished_evaluation_instead_of_training_again(random_backbone, tmp_path):
    first = evaluate(digits_eval(random_backbone, tmp_path, "eval.epochs=1"), command="test")
    second = evaluate(digits_eval(random_backbone, tmp_path, "eval.epochs=1"), command="test")
    assert (second.acc1, second.acc5, second.best_acc1) == (first.acc1, first.acc5, first.best_acc1)
    assert len([line for line in stats_of(tmp_path) if "loss" in line]) == len(
        [line for line in stats_of(tmp_path) if "loss" in line and line["epoch"] == 0])


@pytest.mark.parametrize("workers", ["auto", "1"])
def test_evaluation_with_loading_processes_equals_loading_in_process(random_backbone, tmp_path, workers):
    """data.workers auto (one process on two cores) or 1 reads the same images as 0 (specs/digits-linear.yaml)."""
    in_process = evaluate(digits_eval(random_backbone, tmp_path / "0", "eval.mode=knn"), command="test")
    loaded = evaluate(digits_eval(random_backbone, tmp_path / workers, "eval.mode=knn", f"data.workers={workers}",
                                  "data.prefetch=auto"), command="test")
    assert (loaded.acc1, loaded.acc5) == (in_process.acc1, in_process.acc5)


def test_knn_mode_matches_the_probe_computed_directly(random_backbone, tmp_path):
    from service.data.datasets import labelled_images
    from service.data.loader import Transformed
    from service.evaluation.probes import gathered_features
    from service.method.transforms import classification_pipelines

    spec = digits_eval(random_backbone, tmp_path, "eval.mode=knn")
    result = evaluate(spec, command="test")
    _, val = classification_pipelines(spec.data)
    network = build_backbone("resnet18", "cifar")
    network.load_state_dict(torch.load(random_backbone, weights_only=True))
    bank = gathered_features(network, Transformed(labelled_images(spec.data, True), val))
    queries = gathered_features(network, Transformed(labelled_images(spec.data, False), val))
    top1, top5 = topk_correct(knn_scores(*bank, queries[0], 10, k=200, temperature=0.1), queries[1])
    assert result.acc1 == pytest.approx(100 * top1 / len(queries[1]))
    assert result.acc5 == pytest.approx(100 * top5 / len(queries[1]))


def test_torch_hub_returns_the_trained_classifier_and_the_backbone(random_backbone, tmp_path):
    evaluate(digits_eval(random_backbone, tmp_path, "eval.epochs=1"), command="test")
    x = torch.rand(4, 3, 16, 16)
    classifier = torch.hub.load(str(ROOT), "resnet18", source="local", weights=str(tmp_path / "classifier.pth"))
    saved = torch.load(tmp_path / "classifier.pth", weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in classifier.state_dict().items())
    assert classifier.eval()(x).shape == (4, 10)
    backbone = torch.hub.load(str(ROOT), "resnet18", source="local", weights=str(random_backbone))
    reference = build_backbone("resnet18", "cifar").eval()
    reference.load_state_dict(torch.load(random_backbone, weights_only=True))
    torch.testing.assert_close(backbone.eval()(x), reference(x))
    with pytest.raises(ValueError, match="no weights are published"):
        torch.hub.load(str(ROOT), "resnet50", source="local")


def test_torch_hub_resnet50_returns_an_exported_backbone(tmp_path):
    from service.method.model import BarlowTwins
    from service.spec import ModelSpec
    from service.storage.export import backbone_state_dict

    torch.manual_seed(2)
    trained = BarlowTwins(ModelSpec(backbone="resnet50", projector="64-64"))  # the reference's backbone
    torch.save(backbone_state_dict(trained), tmp_path / "resnet50.pth")
    model = torch.hub.load(str(ROOT), "resnet50", source="local", weights=str(tmp_path / "resnet50.pth")).eval()
    x = torch.rand(2, 3, 64, 64)
    features = model(x)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, trained.backbone.eval()(x))
