"""A whole training run's log lines as a pod's log collector reads them (one JSON object per line: time, level, rank,
step, message), and what a crashing torchrun worker leaves in torchrun's error file: its traceback."""

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


def test_a_worker_that_raises_leaves_its_traceback_in_torchrun_error_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
         "0", "tests/support/raising_worker.py", *train_args(str(tmp_path / "run"))],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0

    # torchrun's summary prints the root cause from the failed worker's error file
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "error_file: <N/A>" not in root_cause, root_cause
    assert "RuntimeError: boom at step 3" in root_cause
    assert re.search(r'service/__main__\.py", line \d+, in main\n\s+return cli\.main\(\)', root_cause), root_cause
    assert re.search(r'service/cli/training\.py", line \d+, in train_command\n\s+result = train\(',
                     root_cause), root_cause
