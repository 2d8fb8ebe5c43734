"""service/launch/status.py: the status of a local_cwd job points to its run (the TorchX runner stubbed)."""

from __future__ import annotations

from service.launch.status import print_status
from service.spec import StorageSpec
from tests.support.progress import Runner


def test_status_of_a_local_job_points_to_the_run(monkeypatch, capsys):
    monkeypatch.setattr("service.launch.status.get_runner", lambda: Runner("AppStatus: SUCCEEDED"))
    assert print_status("local_cwd://torchx/barlowtwins-abc", StorageSpec()) == 0
    assert capsys.readouterr().out.splitlines() == [
        "AppStatus: SUCCEEDED",
        "the run's progress: barlow status RUN_URL (the job's run.output; the local_cwd scheduler keeps no record "
        "of it)"]
