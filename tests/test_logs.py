"""Log lines for pods (one JSON object per line: time, level, rank, step, message) and what a failed worker leaves in
torchrun's error file: the traceback of an unforeseen error, the message of a user's error."""

import io
import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from service.cli import main
from service.observe.logs import configure_logging, record_user_error, set_step

ROOT = Path(__file__).resolve().parents[1]
BARLOW = Path(sys.executable).parent / "barlow"
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "KUBERNETES_SERVICE_HOST", "TORCHELASTIC_ERROR_FILE")
log = logging.getLogger("barlow")


class Stream(io.StringIO):
    """Standard error that is, or is not, a terminal."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(autouse=True)
def restored_logger(monkeypatch):
    """Each test starts outside any launcher and leaves the barlow logger and the step as it found them."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    state = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.level, log.propagate = state
    set_step(None)


def logged(monkeypatch, log_format: str, tty: bool = False) -> Stream:
    stream = Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(log_format)
    return stream


def test_json_line_carries_time_level_rank_step_and_message(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    stream = logged(monkeypatch, "json")
    log.info("not shown: workers but rank 0 log warnings only")
    log.warning("before training")
    set_step(7)
    log.warning("loss %.2f", 1.5)

    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first == {"time": first["time"], "level": "WARNING", "rank": 3, "step": None, "message": "before training"}
    assert second == {"time": second["time"], "level": "WARNING", "rank": 3, "step": 7, "message": "loss 1.50"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", second["time"])
    assert abs(datetime.fromisoformat(second["time"]) - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_json_line_of_an_exception_holds_its_traceback_on_the_same_line(monkeypatch):
    stream = logged(monkeypatch, "json")
    try:
        raise ValueError("unreadable shard")
    except ValueError:
        log.exception("loading failed")

    text = stream.getvalue()
    assert text.count("\n") == 1
    line = json.loads(text)
    assert (line["level"], line["rank"], line["message"]) == ("ERROR", 0, "loading failed")
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("ValueError: unreadable shard")


def test_text_lines_are_as_before(monkeypatch):
    stream = logged(monkeypatch, "text")
    log.info("training")
    monkeypatch.setenv("RANK", "1")
    configure_logging("text")
    log.info("not shown")
    log.warning("slow storage")
    assert re.fullmatch(r"\d\d:\d\d:\d\d training\n\d\d:\d\d:\d\d \[rank 1\] slow storage\n", stream.getvalue())


@pytest.mark.parametrize("tty, in_pod, json_lines", [
    (False, True, True), (False, False, False), (True, True, False), (True, False, False),
])
def test_auto_is_json_only_in_a_pod_without_a_terminal(monkeypatch, tty, in_pod, json_lines):
    if in_pod:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    stream = logged(monkeypatch, "auto", tty)
    log.info("hello")
    assert stream.getvalue().startswith("{") == json_lines


def test_configuring_again_replaces_the_handler(monkeypatch):
    stream = logged(monkeypatch, "json")
    configure_logging("json")
    configure_logging("text")
    log.info("once")
    assert stream.getvalue().count("once") == 1 and not stream.getvalue().startswith("{")


def test_a_user_error_under_torchrun_puts_its_one_line_in_the_error_file(monkeypatch, tmp_path, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["train", "specs/digits.yaml", "--set", "optim.lr_weight=0.3"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("barlow: ") and "did you mean 'lr_weights'?" in printed

    # as torchrun reads and shows it, the failure's root cause: what the user saw, no traceback
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("python -m service", {0: failure}).format_msg()
    assert "traceback : " + printed.replace("\n", "\n  ") + "\n" in summary and "Traceback" not in summary


def test_no_error_file_outside_torchrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record_user_error("barlow: a spec error")
    assert list(tmp_path.iterdir()) == []


def barlow_train(output: Path, *overrides: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    return subprocess.run(
        [str(BARLOW), "train", "specs/digits.yaml", "--set", "optim.epochs=1", "--set", "run.log_every=1", "--set",
         "monitor.knn_every_epochs=null", "--set", "optim.batch_size=256", "--set", "model.projector=64-64-64",
         "--set", f"run.output={output}", *overrides],
        cwd=ROOT, env={**env, **environment}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, environment", [
    (["--set", "run.log_format=json"], {}),
    ([], {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}),  # auto, in a pod: standard error is a pipe here
], ids=["json", "auto-in-pod"])
def test_a_training_run_logs_one_json_object_per_line(tmp_path, overrides, environment):
    result = barlow_train(tmp_path / "run", *overrides, **environment)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses

    assert {line["rank"] for line in lines} == {0}
    assert lines[0]["step"] is None  # before training
    progress = [(line["step"], re.match(r"epoch 0 step (\d+)/4 loss", line["message"])) for line in lines]
    trained = [step for step, match in progress if match]
    assert trained == [int(match.group(1)) for _, match in progress if match] == [0, 1, 2, 3]
    stats = (tmp_path / "run" / "stats.txt").read_text().splitlines()[1:]
    assert trained == [json.loads(line)["step"] for line in stats if '"loss"' in line]


@pytest.mark.slow
def test_a_worker_that_raises_leaves_its_traceback_in_torchrun_error_file(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
         "0", "tests/support/raising_worker.py", "train", "specs/digits.yaml", "--set", f"run.output={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0

    # torchrun's summary prints the root cause from the failed worker's error file
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "error_file: <N/A>" not in root_cause, root_cause
    assert "RuntimeError: boom at step 3" in root_cause
    assert re.search(r'service/__main__\.py", line \d+, in main\n\s+return cli\.main\(\)', root_cause), root_cause
    assert re.search(r'service/cli\.py", line \d+, in main\n\s+result = train\(', root_cause), root_cause
