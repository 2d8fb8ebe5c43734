"""A whole training run's log lines as a pod's log collector reads them (one JSON object per line: time, level, rank,
step, message); what a crashing torchrun worker leaves in torchrun's error file (its traceback); and the exit status
of the pods' main process (service.launch.torchrun): 1 for that crash, 2 for a user's error, which the cluster
schedulers fail at once."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import LOCAL, ROOT, environment, logged_steps, run_barlow, stats_records, train_args

WARNINGS_SHOWN = {"PYTHONWARNINGS": ""}  # as outside the tests: a warning would be a line that is no JSON


@pytest.mark.parametrize("how", ["json", "auto-in-pod"])
def test_a_training_run_logs_one_json_object_per_line(how, local_run, tmp_path):
    """auto-in-pod: the shared local run, run as in a pod (KUBERNETES_SERVICE_HOST set, standard error a pipe, the
    spec's log_format `auto`), its 16 steps. json: run.log_format=json on a copy of it resumed from step 12 (its own
    run, for the setting: the 4 steps it trains suffice)."""
    if how == "auto-in-pod":
        stderr, run = local_run.result.stderr, Path(local_run.url)
    else:
        run = tmp_path / "run"
        shutil.copytree(local_run.url, run)
        shutil.rmtree(run / "checkpoints" / "step-000000016")
        result = run_barlow(*train_args(str(run), *LOCAL, "run.log_format=json"), threads=2, env=WARNINGS_SHOWN)
        assert result.returncode == 0, result.stderr
        stderr = result.stderr
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line parses

    assert {line["rank"] for line in lines} == {0}
    assert lines[0]["step"] is None  # before training
    progress = [(line["step"], re.match(r"epoch 0 step (\d+)/16 loss", line["message"])) for line in lines]
    trained = [step for step, match in progress if match]
    assert trained == [int(match.group(1)) for _, match in progress if match]
    assert trained == (list(range(16)) if how == "auto-in-pod" else [12, 13, 14, 15])
    attempts = (run / "stats.txt").read_text().split("\nbarlow ")  # each attempt's lines after its command line
    assert trained == [line["step"] for line in logged_steps(stats_records(attempts[-1]))]


def pods_main_process(*arguments: str) -> subprocess.CompletedProcess:
    """What a pod runs (the components' command): torchrun's entry point through service.launch.torchrun."""
    return subprocess.run([sys.executable, "-m", "service.launch.torchrun", "--standalone", *arguments],
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)


def test_a_worker_that_raises_leaves_its_traceback_in_torchrun_error_file(tmp_path):
    result = pods_main_process("--nproc-per-node", "2", "--max-restarts", "0", "tests/support/raising_worker.py",
                               *train_args(str(tmp_path / "run")))
    assert result.returncode == 1, result.stderr[-3000:]  # a crash: the scheduler retries it

    # torchrun's summary prints the root cause from the failed worker's error file
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "error_file: <N/A>" not in root_cause, root_cause
    assert "RuntimeError: boom at step 3" in root_cause
    assert re.search(r'service/__main__\.py", line \d+, in main\n\s+return cli\.main\(\)', root_cause), root_cause
    assert re.search(r'service/cli/training\.py", line \d+, in train_command\n\s+result = train\(',
                     root_cause), root_cause


def test_a_workers_user_error_is_the_pods_exit_status_2(tmp_path):
    """The run's folder cannot be made (a file stands where it must go): the worker's `barlow` exits 2 after its one
    line, and the pod's main process exits 2, not torchrun's 1."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    result = pods_main_process("--nproc-per-node", "1", "--max-restarts", "0", "-m", "service",
                               *train_args(str(blocked / "run")))
    assert result.returncode == 2, result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "exitcode  : 2" in root_cause and "barlow: " in root_cause, root_cause
