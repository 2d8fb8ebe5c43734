"""A spec is read once at submission: `barlow submit` chooses the component by the spec's kind, and the component
validates the same text (before: three reads, three GETs of an S3 spec, each free to see another version)."""

from __future__ import annotations

import pytest

from service.launch.job_spec import resolve_job_spec
from service.launch.submit import Submission
from service.launch.torchx_api import dryrun_app
from service.spec import TrainSpec, loading
from tests.support.commands import barlow_job, containers, shipped_spec, torchx_job

SPEC = "data: {dataset: digits}\noptim: {epochs: 2, warmup_epochs: 1, batch_size: 64}\nrun: {output: s3://b/mine}\n"
EVALUATION = "backbone: {arch: resnet18}\ndata: {dataset: digits}\neval: {mode: knn}\nrun: {output: s3://b/eval}\n"


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every read of a spec's source, by source."""
    sources: list[str] = []
    read = loading._read_spec_text

    def counted(source, overrides):
        sources.append(source)
        return read(source, overrides)

    monkeypatch.setattr(loading, "_read_spec_text", counted)
    return sources


@pytest.mark.parametrize("text, component", [(SPEC, "train"), (EVALUATION, "evaluate")])
def test_barlow_submit_reads_the_spec_once(tmp_path, reads, text, component):
    spec = tmp_path / "mine.yaml"
    spec.write_text(text)
    submission = Submission.prepare(str(spec), {}, ["optim.epochs=3"] if component == "train" else [], "local_cwd", {})
    assert reads == [str(spec)]
    command = dryrun_app(submission.info).roles[0].args[-1]
    assert f"-m service {component} env:BARLOW_SPEC" in command  # the component the spec's kind asks for


def test_outside_a_submission_every_load_reads_afresh(tmp_path, reads):
    """The memory lasts one submission: a later one sees the spec as it is then."""
    spec = tmp_path / "mine.yaml"
    spec.write_text(SPEC)
    Submission.prepare(str(spec), {}, [], "local_cwd", {})
    spec.write_text(SPEC.replace("epochs: 2", "epochs: 5"))
    loading.load_spec(str(spec))
    assert reads == [str(spec), str(spec)]
    assert loading.load_spec(str(spec)).optim.epochs == 5


def test_torchx_run_reads_the_spec_once(tmp_path, reads):
    """`torchx run` calls the component alone: its kind check and its validation share one read."""
    spec = tmp_path / "mine.yaml"
    spec.write_text(SPEC)
    job = resolve_job_spec(str(spec), ["optim.epochs=3"], world_size=2, kind=TrainSpec)
    assert reads == [str(spec)] and "epochs: 3" in job.env["BARLOW_SPEC"]


@pytest.mark.parametrize("command", ["barlow submit", "torchx run"])
def test_the_commands_users_type_read_the_spec_once(tmp_path, reads, command):
    """The same through the CLIs' entry points, with the arguments as strings, as a user types them."""
    spec = tmp_path / "mine.yaml"
    spec.write_text(SPEC)
    if command == "barlow submit":
        job = barlow_job(str(spec), "--gpu", "1", "--set", "optim.epochs=3", cwd=tmp_path)
    else:
        job = torchx_job("barlowtwins.train", "--spec", str(spec), "--gpu", "1", "optim.epochs=3", cwd=tmp_path)
    assert reads == [str(spec)]
    assert shipped_spec(containers(job)[0])["optim"]["epochs"] == 3
