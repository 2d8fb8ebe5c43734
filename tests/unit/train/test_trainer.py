"""service/train/trainer.py's build phase: the resolved spec.yaml is written before the first step (so that a running
or pre-empted run has one), only once run.output's lease is ours, and rewritten by every later attempt."""

from pathlib import Path

import pytest

from service.errors import CheckpointError
from service.spec import load_spec, spec_to_yaml
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
