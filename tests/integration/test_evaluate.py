"""Short real runs of the reference's evaluation protocols on the digits (specs/digits-linear.yaml at 8 px), in
process: the linear probe, finetuning, kNN, resuming, loading processes, and torch.hub on the results. The probes'
parts: tests/unit/evaluation/test_probes.py.

The runs that several tests read are made once for the module (`linear_probe`, `knn_in_process`); a test that
changes one works on a copy.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from service.evaluation.evaluate import evaluate
from service.evaluation.probes import knn_scores, topk_correct
from service.method.model import build_backbone
from service.spec import EvaluateSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory) -> Path:
    """An exported-format backbone: a randomly initialised CIFAR-stem ResNet-18 without fc."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(build_backbone("resnet18", "cifar").state_dict(), path)
    return path


def digits_eval(weights: Path, output: Path, *overrides: str) -> EvaluateSpec:
    """specs/digits-linear.yaml at 8 px (the digits' own size) for 2 epochs, then `overrides`."""
    return load_spec(ROOT / "specs" / "digits-linear.yaml", [
        f"backbone.weights={weights}", f"run.output={output}", "data.image_size=8", "eval.epochs=2", *overrides],
        kind=EvaluateSpec)


def stats_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "stats.txt").read_text().splitlines() if line.startswith("{")]


# The linear probe reads the digits at 16 px, as specs/digits-linear.yaml: at 8 px a random backbone's probe stays
# near chance after 2 epochs (13 % top-1), and the test asserts that it learns.
LINEAR = ["data.image_size=16"]


@pytest.fixture(scope="module")
def linear_probe(random_backbone, tmp_path_factory):
    """The linear probe of the random backbone, 2 epochs: (its result, its run.output)."""
    output = tmp_path_factory.mktemp("linear")
    return evaluate(digits_eval(random_backbone, output, *LINEAR), command="test"), output


@pytest.fixture(scope="module")
def knn_in_process(random_backbone, tmp_path_factory):
    """The kNN evaluation of the random backbone, its images loaded in this process (specs/digits-linear.yaml)."""
    return evaluate(digits_eval(random_backbone, tmp_path_factory.mktemp("knn"), "eval.mode=knn"), command="test")


def test_linear_probe_trains_only_fc_and_keeps_the_backbone_bit_identical(random_backbone, linear_probe):
    result, output = linear_probe
    loaded = torch.load(random_backbone, weights_only=True)
    classifier = torch.load(output / "classifier.pth", weights_only=True)
    assert set(classifier) == set(loaded) | {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(classifier[key], value), key  # weights and BatchNorm statistics
    assert classifier["fc.bias"].abs().sum() > 0  # trained from its zero initialisation
    assert 15 < result.acc1 <= 100 and result.acc5 >= result.acc1  # above chance (10%) after 2 epochs
    epochs = [line for line in stats_of(output) if "acc1" in line]
    assert [line["epoch"] for line in epochs] == [0, 1]
    assert set(epochs[0]) == {"epoch", "acc1", "acc5", "best_acc1", "best_acc5", "time"}
    assert epochs[-1]["best_acc1"] == max(line["acc1"] for line in epochs)
    saved = json.loads((output / "results.json").read_text())
    assert saved["acc1"] == result.acc1 and saved["train_images"] == 1078


def test_finetune_changes_the_backbone_on_a_balanced_subset(random_backbone, tmp_path):
    result = evaluate(digits_eval(random_backbone, tmp_path, "eval.mode=finetune", "eval.epochs=1",
                                  "data.train_percent=10"), command="test")
    from collections import Counter

    from service.data.datasets import Digits

    per_class = Counter(Digits(8, train=True).targets).values()
    assert result.train_images == sum(round(count / 10) for count in per_class)  # 10% of every class
    loaded = torch.load(random_backbone, weights_only=True)
    classifier = torch.load(tmp_path / "classifier.pth", weights_only=True)
    changed = [key for key, value in loaded.items() if not torch.equal(classifier[key], value)]
    assert "conv1.weight" in changed and "layer4.1.bn2.weight" in changed  # from the stem to the last block


def test_rerun_resumes_the_finished_evaluation_instead_of_training_again(random_backbone, linear_probe, tmp_path):
    """On a copy of the finished linear probe: the same command again trains no step and reports the same."""
    first, finished = linear_probe
    rerun = tmp_path / "rerun"
    shutil.copytree(finished, rerun)
    trained = [line for line in stats_of(rerun) if "loss" in line]
    second = evaluate(digits_eval(random_backbone, rerun, *LINEAR), command="test")
    assert (second.acc1, second.acc5, second.best_acc1) == (first.acc1, first.acc5, first.best_acc1)
    assert [line for line in stats_of(rerun) if "loss" in line] == trained


def test_evaluation_with_loading_processes_equals_loading_in_process(random_backbone, knn_in_process, tmp_path):
    """Two loading processes (consecutive batches from different processes), the prefetch sized by `auto`, read the
    same images as loading in process. How `auto` sizes the processes: tests/unit/data/test_loader.py."""
    loaded = evaluate(digits_eval(random_backbone, tmp_path, "eval.mode=knn", "data.workers=2", "data.prefetch=auto"),
                      command="test")
    assert (loaded.acc1, loaded.acc5) == (knn_in_process.acc1, knn_in_process.acc5)


def test_knn_mode_matches_the_probe_computed_directly(random_backbone, knn_in_process, tmp_path):
    from service.data.datasets import labelled_images
    from service.data.loader import Transformed
    from service.evaluation.probes import gathered_features
    from service.method.transforms import classification_pipelines

    spec = digits_eval(random_backbone, tmp_path, "eval.mode=knn")
    _, val = classification_pipelines(spec.data)
    network = build_backbone("resnet18", "cifar")
    network.load_state_dict(torch.load(random_backbone, weights_only=True))
    bank = gathered_features(network, Transformed(labelled_images(spec.data, True), val))
    queries = gathered_features(network, Transformed(labelled_images(spec.data, False), val))
    top1, top5 = topk_correct(knn_scores(*bank, queries[0], 10, k=200, temperature=0.1), queries[1])
    assert knn_in_process.acc1 == pytest.approx(100 * top1 / len(queries[1]))
    assert knn_in_process.acc5 == pytest.approx(100 * top5 / len(queries[1]))


def test_torch_hub_returns_the_trained_classifier_and_the_backbone(random_backbone, linear_probe):
    _, output = linear_probe
    x = torch.rand(4, 3, 8, 8)
    classifier = torch.hub.load(str(ROOT), "resnet18", source="local", weights=str(output / "classifier.pth"))
    saved = torch.load(output / "classifier.pth", weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in classifier.state_dict().items())
    assert classifier.eval()(x).shape == (4, 10)
    backbone = torch.hub.load(str(ROOT), "resnet18", source="local", weights=str(random_backbone))
    reference = build_backbone("resnet18", "cifar").eval()
    reference.load_state_dict(torch.load(random_backbone, weights_only=True))
    torch.testing.assert_close(backbone.eval()(x), reference(x))
    with pytest.raises(ValueError, match="no weights are published"):
        torch.hub.load(str(ROOT), "resnet50", source="local")


def test_torch_hub_resnet50_returns_an_exported_backbone(tmp_path):
    from service.checkpoint.export import backbone_state_dict
    from service.method.model import BarlowTwins
    from service.spec import ModelSpec

    torch.manual_seed(2)
    trained = BarlowTwins(ModelSpec(backbone="resnet50", projector="64-64"))  # the reference's backbone
    torch.save(backbone_state_dict(trained), tmp_path / "resnet50.pth")
    model = torch.hub.load(str(ROOT), "resnet50", source="local", weights=str(tmp_path / "resnet50.pth")).eval()
    x = torch.rand(2, 3, 64, 64)
    features = model(x)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, trained.backbone.eval()(x))
