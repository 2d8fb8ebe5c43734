"""What a run writes when it starts, before its first step: its resolved spec.yaml (so that a running or pre-empted
run has one), written only once run.output's lease is ours and rewritten by every later attempt; by pretraining's
build phase and by the evaluation."""

from pathlib import Path

import pytest
import torch

import service.evaluation.evaluate as evaluation
from service.errors import CheckpointError
from service.spec import EvaluateSpec, load_spec, spec_to_yaml
from service.train.trainer import build
from tests.support.lease_cases import foreign_record, write_lease
from tests.support.runs import DIGITS, ROOT, TINY, stats_records
from tests.support.training import WORKER

EARLIER = "model:\n  projector: 16-16\n"  # another attempt's spec.yaml


def tiny_spec(output: Path):
    return load_spec(ROOT / DIGITS, [*TINY, f"run.output={output}", "run.tensorboard=false"])


def test_the_build_phase_writes_the_resolved_spec_before_the_first_step(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "spec.yaml").write_text(EARLIER)  # an earlier attempt's: a resume rewrites it with its own
    spec = tiny_spec(output)
    run = build(spec, "barlow train", WORKER, force=False)
    try:
        assert run.step == 0 and (output / "spec.yaml").read_text() == spec_to_yaml(spec)
        records = stats_records((output / "stats.txt").read_text())
        assert [record.get("event") for record in records] == ["start"]  # no step trained yet
    finally:
        run.close()


def test_a_run_refused_by_the_lease_leaves_the_holders_spec_yaml(tmp_path):
    output = tmp_path / "run"
    write_lease(str(output), tiny_spec(output).storage, foreign_record().to_json())  # a live job elsewhere
    (output / "spec.yaml").write_text(EARLIER)
    with pytest.raises(CheckpointError, match="job-elsewhere"):
        build(tiny_spec(output), "barlow train", WORKER, force=False)
    assert (output / "spec.yaml").read_text() == EARLIER


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
