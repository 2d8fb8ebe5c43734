"""service/launch/torchrun.py: the pods' main process exits 2 when a failed worker exited 2 (a user's error), 1 on
any other failure, 0 when torchrun succeeds; torchrun itself is replaced by one that fails as told (what runs it for
real: tests/e2e/test_logs.py)."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import service.launch.torchrun as pods_torchrun


def failing(*exit_codes: int):
    def torchrun(argv):
        assert argv == ["--nnodes", "2", "-m", "service", "train", "env:BARLOW_SPEC"]
        failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
                    for rank, code in enumerate(exit_codes)}
        if failures:
            raise ChildFailedError("service", failures)
    return torchrun


@pytest.mark.parametrize("exit_codes, expected", [
    ((), 0),
    ((2,), 2),  # rank 0 stopped on a bad spec or unreachable storage
    ((-15, 2), 2),  # and the agent stopped the other worker
    ((1,), 1),
    ((1, -9), 1),
    ((21,), 1),
])
def test_the_exit_status_says_whether_a_worker_stopped_on_the_users_error(monkeypatch, capsys, exit_codes,
                                                                         expected):
    monkeypatch.setattr(pods_torchrun, "torchrun", failing(*exit_codes))
    assert pods_torchrun.main(["--nnodes", "2", "-m", "service", "train", "env:BARLOW_SPEC"]) == expected
    if exit_codes:
        assert "service FAILED" in capsys.readouterr().err  # torchrun's report of the failures is kept
