"""Checkpoints that can be trusted, through the `barlow` executable as a user runs it, on local folders and on the
moto S3 server: corrupt objects are found on read and skipped, a diverging run saves nothing non-finite, one run
owns an output, and a resume refuses a changed recipe unless told, then continues from the last epoch's checkpoint.

The reference is the shared local run (tests/e2e/conftest.py): the tiny recipe on one worker, checkpoints 8, 12 and
16. A test that changes it works on a copy, and its reruns pass the reference's settings (LOCAL) and thread count,
so that they compute bit for bit as it did. A test whose run must be alive while something happens to it (a second
run refused, the store going away) pauses it there (SIGSTOP, SIGCONT): no race with the run's speed.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from service.checkpoint.catalog import list_checkpoints, verify_checkpoint
from service.checkpoint.export import checkpoint_backbone, read_weights
from service.cli.main import main
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.runs import (
    LOCAL,
    S3_ENV,
    events,
    logged_steps,
    resumed_step,
    run_barlow,
    start_barlow,
    stats_records,
    train_args,
)
from tests.support.s3_server import S3Server

THREADS = 2  # the shared local run's: the same thread count computes the same bits


def barlow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_barlow(*args, threads=THREADS, env={**S3_ENV, **(env or {})})


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`barlow ARGS` through service.cli.main.main in this process: its exit code and what it printed. The barlow logger
    is left as it was (main points it at the captured standard error)."""
    logger = logging.getLogger("barlow")
    state = logger.handlers[:], logger.level, logger.propagate
    capsys.readouterr()
    try:
        code = main(list(args))
    finally:
        logger.handlers[:], logger.level, logger.propagate = state
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["barlow", *args], code, printed.out, printed.err)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("barlow: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def copy_of(local_run, tmp_path: Path) -> Path:
    shutil.copytree(local_run.url, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(params=["file", "s3"])
def copy_of_reference(request, local_run, tmp_path):
    """A copy of the reference run's folder (its checkpoints, stats and spec) on local disk or on S3; returns (url,
    storage, endpoint)."""
    if request.param == "file":
        return f"file://{copy_of(local_run, tmp_path)}", StorageSpec(), None
    server = request.getfixturevalue("s3_server")
    url = request.getfixturevalue("s3_bucket") + "/run"
    storage = StorageSpec(endpoint_url=server.endpoint_url)
    fs, path = filesystem(url, storage)
    source = Path(local_run.url)
    for file in source.rglob("*"):
        if file.is_file() and file.name != "resnet18.pth" and "tensorboard" not in file.parts:
            fs.put_file(str(file), f"{path}/{file.relative_to(source)}")
    return url, storage, server.endpoint_url


def flip_bytes(url: str, storage: StorageSpec, count: int = 16) -> None:
    """Corrupt an object in place, keeping its size (bit rot, a bad disk, a torn copy)."""
    fs, path = filesystem(url, storage)
    data = bytearray(fs.cat_file(path))
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    fs.pipe_file(path, bytes(data))


def test_corrupt_newest_checkpoints_are_reported_never_exported_and_the_run_ends_as_uninterrupted(
        copy_of_reference, local_run, tmp_path, capsys):
    """Each of a checkpoint's two kinds of object is checked: the newest checkpoint's metadata and the data of the one
    before are corrupted, and the rerun falls back past both to step 8. The listings and exports go through
    service.cli.main.main, the executable's entry point, in this process (the rerun through the executable)."""
    url, storage, endpoint = copy_of_reference
    victims = {16: ".metadata", 12: "__0_0.distcp"}
    for step, victim in victims.items():
        flip_bytes(f"{url}/checkpoints/step-{step:09d}/{victim}", storage)
    storage_args = ["--endpoint-url", endpoint] if endpoint else []

    listing = cli(capsys, "checkpoints", "ls", "--verify", url, *storage_args)
    assert listing.returncode == 1, listing.stdout + listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert rows.keys() == {"8", "12", "16"} and rows["8"].endswith("  verified")
    for step, victim in victims.items():
        assert "CORRUPT" in rows[str(step)] and victim in rows[str(step)]
    plain = cli(capsys, "checkpoints", "ls", url, *storage_args)  # sizes only: the flips keep them
    assert plain.returncode == 0 and all(line.endswith("  valid") for line in plain.stdout.splitlines()[1:])

    for step, victim in victims.items():
        exported = tmp_path / f"corrupt-{step}.pth"
        refused = cli(capsys, "export", f"{url}/checkpoints/step-{step:09d}", str(exported), *storage_args)
        assert refused.returncode == 2 and victim in one_error_line(refused) and not exported.exists()

    rerun = barlow(*train_args(url, *LOCAL, endpoint=endpoint))  # the same command, as after a lost node
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for step, victim in victims.items():
        assert re.search(rf"step-{step:09d} is corrupt and will not be loaded: object {re.escape(victim)}",
                         rerun.stderr), rerun.stderr[-3000:]
    assert resumed_step(rerun.stderr) == 8
    assert_same_tensors(read_weights(f"{url}/resnet18.pth", storage),
                        read_weights(f"{local_run.url}/resnet18.pth", StorageSpec()))
    assert [(c.step, verify_checkpoint(c.url, storage).valid) for c in list_checkpoints(url, storage)] == [
        (8, True), (12, True), (16, True)]


def test_no_checkpoint_that_verifies_is_an_error_that_deletes_nothing(local_run, tmp_path):
    run = copy_of(local_run, tmp_path)
    for step in (8, 12, 16):
        flip_bytes(str(run / f"checkpoints/step-{step:09d}/__0_0.distcp"), StorageSpec())
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = barlow(*train_args(str(run), *LOCAL))
    assert result.returncode == 2 and "no checkpoint under" in one_error_line(result)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_diverging_run_stops_at_the_named_step_and_commits_nothing_non_finite(s3_server, s3_bucket):
    """Trains its own runs: the one that diverges, and its resume with a sane learning rate. On S3 only: the guard
    decides before anything is written, and a local folder's commits and resumes are the other tests' (the file
    variant, 21 s of CI, found nothing this one does not)."""
    endpoint, url = s3_server.endpoint_url, s3_bucket + "/run"
    storage = StorageSpec(endpoint_url=endpoint)
    diverging = ["optim.lr_weights=1e6", "optim.lr_biases=1e6", "optim.warmup_epochs=0", "checkpoint.every_steps=2",
                 "run.log_every=100"]
    result = barlow(*train_args(url, *diverging, endpoint=endpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result)
    bad_step = int(re.search(r"non-finite at step (\d+)", line).group(1))
    newest = re.search(r"Newest finite checkpoint: (\S+)\.", line).group(1)
    checkpoints = list_checkpoints(url, storage)
    assert checkpoints and newest == checkpoints[-1].url and checkpoints[-1].step <= bad_step
    fs, path = filesystem(url, storage)
    assert not fs.exists(f"{path}/resnet18.pth")  # nothing exported
    for checkpoint in checkpoints:  # every committed state is finite: read each backbone (as `barlow export`) and look
        backbone = checkpoint_backbone(checkpoint.url, storage).values()
        assert all(torch.isfinite(t).all() for t in backbone if t.is_floating_point())

    sane = ["optim.lr_weights=0.2", "optim.lr_biases=0.0048", "optim.warmup_epochs=0", "checkpoint.every_steps=2",
            "checkpoint.allow_changes=[optim.lr_weights,optim.lr_biases]"]
    resumed = barlow(*train_args(url, *sane, endpoint=endpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stderr) == checkpoints[-1].step
    backbone = read_weights(f"{url}/resnet18.pth", storage)
    assert all(torch.isfinite(t).all() for t in backbone.values() if t.is_floating_point())


def wait_for(predicate, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[0][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lock_is_free(lock: Path) -> bool:
    descriptor = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def pause(process: subprocess.Popen, lock: Path | None = None) -> None:
    """SIGSTOP the run, at a moment it holds no flock on `lock` (a local lease's lock file, which a paused holder
    would keep from every other run)."""
    for _ in range(100):
        os.kill(process.pid, signal.SIGSTOP)
        while Path(f"/proc/{process.pid}/stat").read_text().split(")")[-1].split()[0] != "T":
            time.sleep(0.01)
        if lock is None or lock_is_free(lock):
            return
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"{lock} stayed locked")


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_second_run_on_the_same_output_is_refused_and_the_first_loses_nothing(where, request, tmp_path):
    """Trains its own run: the first, paused while it holds the lease and the second one is refused."""
    endpoint = request.getfixturevalue("s3_server").endpoint_url if where == "s3" else None
    url = request.getfixturevalue("s3_bucket") + "/run" if where == "s3" else str(tmp_path / "run")
    storage = StorageSpec(endpoint_url=endpoint)
    fs, path = filesystem(url, storage)
    first = start_barlow(*train_args(url, endpoint=endpoint), threads=THREADS, env=S3_ENV)
    try:
        wait_for(lambda: fs.exists(f"{path}/lease.json"), "its lease", first)
        pause(first, None if endpoint else Path(f"{path}/lease.json.lock"))
        try:
            second = barlow(*train_args(url, "run.log_every=2", endpoint=endpoint))
            assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        finally:
            os.kill(first.pid, signal.SIGCONT)
        line = one_error_line(second)
        assert second.returncode == 2 and "is in use by job" in line and f"pid {first.pid}" in line, line
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    command, *text = fs.cat_file(f"{path}/stats.txt").decode().splitlines()
    records = stats_records("\n".join(text))
    assert "run.log_every=2" not in command and [line["step"] for line in logged_steps(records)] == list(range(16))
    assert [line["step"] for line in events(records) if line["event"] == "start"] == [0]  # the refused wrote nothing
    checkpoints = list_checkpoints(url, storage)
    assert [c.step for c in checkpoints] == [12, 16]
    assert len({c.run_id for c in checkpoints}) == 1 and checkpoints[0].run_id
    assert not fs.exists(f"{path}/lease.json")  # given back at the end


def test_a_dead_runs_lease_is_taken_over_with_force(local_run, tmp_path):
    run = copy_of(local_run, tmp_path)
    holder = dict(run_id=None, job_id="someone-else", host="another-host", pid=1, started="2026-12-02T00:00:00+00:00",
                  heartbeat=time.time(), generation=1, token="t")
    (run / "lease.json").write_text(json.dumps(holder))
    checkpoints, stats = sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "stats.txt").read_text()
    refused = barlow(*train_args(str(run), *LOCAL))
    assert refused.returncode == 2 and "someone-else" in one_error_line(refused)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints  # refused before any write
    assert (run / "stats.txt").read_text() == stats
    forced = barlow(*train_args(str(run), *LOCAL), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "someone-else" in forced.stderr  # the take-over is logged, naming the old holder


def test_resume_refuses_a_changed_recipe_unless_told_and_continues_from_the_last_epochs_checkpoint(local_run, tmp_path):
    """The rerun with two more epochs trains its own steps (16-47) on a copy of the reference. Their losses show that
    training lowers the loss (one epoch of warm-up is too short to tell a trend from the batches' differences), and
    the kNN monitor runs every 2 epochs and after the last."""
    run = copy_of(local_run, tmp_path)
    stats_before = (run / "stats.txt").read_text()
    changed = ["optim.epochs=3", "loss.lambd=0.01", "run.seed=3", "augment.grayscale=0.5"]
    refused = barlow(*train_args(str(run), *LOCAL, *changed))
    line = one_error_line(refused)
    assert refused.returncode == 2
    for field in ("optim.epochs: 1 -> 3", "loss.lambd: 0.0051 -> 0.01", "run.seed: 0 -> 3",
                  "augment.grayscale: 0.2 -> 0.5"):
        assert field in line, line
    assert (run / "stats.txt").read_text() == stats_before  # refused before anything was written
    assert not (run / "lease.json").exists()  # and the lease given back at once, not left to go stale

    neutral = barlow(*train_args(str(run), *LOCAL, "run.log_every=3", "checkpoint.every_steps=5", "data.workers=2"))
    assert neutral.returncode == 0, neutral.stderr[-3000:]  # fields that change no numbers pass

    extended = barlow(*train_args(str(run), *LOCAL, "optim.epochs=3", "checkpoint.allow_changes=[optim.epochs]",
                                  "monitor.knn_every_epochs=2"))
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert resumed_step(extended.stderr) == 16  # the epoch's checkpoint, not step 0
    attempts = (run / "stats.txt").read_text().split("\nbarlow ")  # each attempt's lines after its command line
    records = stats_records(attempts[-1])
    assert records[0]["event"] == "start" and records[0]["step"] == 16
    assert records[0]["resumed_from"].endswith("step-000000016")
    resumed = [record for record in records if "event" not in record]
    assert resumed[0] == {"epoch": 1, "step": 16, "resumed_with_changes": {"optim.epochs": [1, 3]},
                          "time": resumed[0]["time"]}
    training = logged_steps(records)
    assert [line["step"] for line in training] == list(range(16, 48))
    assert [line["epoch"] for line in training] == [1] * 16 + [2] * 16
    assert [(line["epoch"], line["step"]) for line in resumed if "knn_top1" in line] == [(1, 32), (2, 48)]
    newest = list_checkpoints(str(run), StorageSpec())[-1]
    assert newest.step == 48 and newest.manifest["changes"] == [dict(step=16, field="optim.epochs", old=1, new=3)]
    before, after = (read_weights(f"{folder}/resnet18.pth", StorageSpec()) for folder in (local_run.url, run))
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])

    # the last epoch's mean loss against the first's (warm-up), over the same images: measured 0.86; without
    # updates (a learning rate of 1e-9) 1.00 (the second epoch's: 0.96 trained)
    first = [line["loss"] for line in logged_steps(stats_records(attempts[0]))]
    last = [line["loss"] for line in training[16:]]
    assert len(first) == len(last) == 16 and sum(last) < 0.95 * sum(first), (first, last)


def test_a_run_whose_last_checkpoint_does_not_commit_exits_non_zero_and_exports_nothing(aws_env):
    """Trains its own run, on its own S3 server: the one stopped under it."""
    server = S3Server().start()
    try:
        url = server.create_bucket("outage") + "/run"
        storage = StorageSpec(endpoint_url=server.endpoint_url)
        run = start_barlow(*train_args(url, "storage.retries=0", endpoint=server.endpoint_url), threads=THREADS,
                           env=S3_ENV)
        try:
            wait_for(lambda: any(c.valid for c in list_checkpoints(url, storage)), "its first checkpoint", run)
            pause(run)  # the store goes away for the rest of the run, however fast the run is
            server.stop()
        finally:
            os.kill(run.pid, signal.SIGCONT)
        out, _ = run.communicate(timeout=600)
    finally:
        server.stop()
    assert run.returncode == 3, out[-3000:]
    line = [line for line in out.splitlines() if line.startswith("barlow: ")]
    assert len(line) == 1 and "the checkpoint of step 16 was not committed" in line[0] and "Traceback" not in out
    assert "done:" not in out
