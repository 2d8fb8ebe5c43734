"""service/evaluation/evaluate.py: a changed frozen backbone is caught, and the resolved spec.yaml is written before
the evaluation works (linear and kNN). Short real runs of the reference's protocols:
tests/integration/test_evaluate.py."""

import pytest
import torch

import service.evaluation.evaluate as evaluation
from service.evaluation.evaluate import BackboneChanged, _check_unchanged, backbone_state
from service.method.model import build_backbone
from service.spec import EvaluateSpec, load_spec, spec_to_yaml
from tests.support.runs import ROOT


def test_a_changed_frozen_backbone_is_caught():
    network = build_backbone("resnet18", "cifar")
    reference = backbone_state(network)
    _check_unchanged(reference, network)
    network.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(BackboneChanged, match="layer1.0.bn1.running_mean"):
        _check_unchanged(reference, network)


class Started(Exception):
    """Raised where the evaluation would start to train (inside the loop that gives the lease back) or to compute
    features."""


@pytest.mark.parametrize("mode, first_work", [("linear", "checked"), ("knn", "gathered_features")])
def test_the_evaluation_writes_the_resolved_spec_before_it_works(tmp_path, monkeypatch, mode, first_work):
    output = tmp_path / "eval"
    spec = load_spec(ROOT / "specs" / "digits-linear.yaml", [
        "backbone.weights=null", f"run.output={output}", "data.image_size=8", f"eval.mode={mode}"], kind=EvaluateSpec)

    def started(*args, **kwargs):
        assert (output / "spec.yaml").read_text() == spec_to_yaml(spec)
        raise Started

    monkeypatch.setattr(evaluation, first_work, started)
    torch.manual_seed(0)
    with pytest.raises(Started):
        evaluation.evaluate(spec, command="barlow evaluate")
