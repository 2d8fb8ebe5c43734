"""Log lines for pods (one JSON object per line: time, level, rank, step, message) and what a user's error leaves in
torchrun's error file, in process. A whole run's log lines and a crashing worker's traceback are
tests/e2e/test_logs.py's."""

import io
import json
import logging
import re
import sys
from datetime import datetime, timedelta, timezone

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from service.cli.main import main
from service.observe.logs import configure_logging, record_user_error, set_step

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
    """Each test starts outside any launcher and before any step (a training run in this process, an earlier test
    of the same pytest worker, leaves its last), and leaves the barlow logger as it found it."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    set_step(None)
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
