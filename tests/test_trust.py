"""Checkpoints that can be trusted, through the `barlow` executable as a user runs it, on local folders and on the
moto S3 server: corrupt objects are found on read and skipped, a diverging run saves nothing non-finite, one run
owns an output, and a resume refuses a changed recipe unless told.

Every run here is the digits demo shrunk to seconds (8 px, batch 64: 16 steps in one epoch, a checkpoint every 4).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.spec import StorageSpec
from service.storage.checkpoint import list_checkpoints, verify_checkpoint
from service.storage.filesystem import filesystem
from tests.support.runs import resumed_step

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["data.image_size=8", "optim.batch_size=64", "optim.epochs=1", "model.projector=64-64",
          "monitor.knn_every_epochs=null", "checkpoint.every_steps=4", "run.log_every=1"]


def barlow(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "barlow"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})


def train_args(output: str, *extra: str, endpoint: str | None = None) -> list[str]:
    settings = [*RECIPE, f"run.output={output}", *([f"storage.endpoint_url={endpoint}"] if endpoint else []), *extra]
    return ["train", "specs/digits.yaml", *(arg for setting in settings for arg in ("--set", setting))]


def storage_of(url: str, s3_server=None) -> StorageSpec:
    return StorageSpec(endpoint_url=s3_server.endpoint_url) if url.startswith("s3://") else StorageSpec()


def read_backbone(url: str, storage: StorageSpec) -> dict:
    fs, path = filesystem(f"{url}/resnet18.pth", storage)
    with fs.open(path, "rb") as file:
        return torch.load(file, weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("barlow: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its folder, its exported backbone."""
    output = tmp_path_factory.mktemp("reference") / "run"
    result = barlow(*train_args(str(output)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [c.step for c in list_checkpoints(str(output), StorageSpec())] == [12, 16]
    return output, torch.load(output / "resnet18.pth", weights_only=True)


@pytest.fixture(params=["file", "s3"])
def copy_of_reference(request, reference, tmp_path):
    """A copy of the reference run's folder on local disk or on S3; returns (url, storage, endpoint)."""
    source, _ = reference
    if request.param == "file":
        shutil.copytree(source, tmp_path / "run")
        return f"file://{tmp_path}/run", StorageSpec(), None
    server = request.getfixturevalue("s3_server")
    url = request.getfixturevalue("s3_bucket") + "/run"
    storage = StorageSpec(endpoint_url=server.endpoint_url)
    fs, path = filesystem(url, storage)
    for file in source.rglob("*"):
        if file.is_file():
            fs.pipe_file(f"{path}/{file.relative_to(source)}", file.read_bytes())
    return url, storage, server.endpoint_url


def flip_bytes(url: str, storage: StorageSpec, count: int = 16) -> None:
    """Corrupt an object in place, keeping its size (bit rot, a bad disk, a torn copy)."""
    fs, path = filesystem(url, storage)
    data = bytearray(fs.cat_file(path))
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_corrupt_newest_checkpoint_is_reported_never_exported_and_the_run_ends_as_uninterrupted(
        victim, copy_of_reference, reference, tmp_path):
    url, storage, endpoint = copy_of_reference
    newest = f"{url}/checkpoints/step-000000016"
    flip_bytes(f"{newest}/{victim}", storage)
    env = {"PYTHONWARNINGS": "ignore"}
    storage_args = ["--endpoint-url", endpoint] if endpoint else []

    listing = barlow("checkpoints", "ls", "--verify", url, *storage_args, env=env)
    assert listing.returncode == 1, listing.stdout + listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "verified" in rows["12"] and "CORRUPT" in rows["16"] and victim in rows["16"]
    plain = barlow("checkpoints", "ls", url, *storage_args, env=env)  # sizes only: the flip keeps them
    assert plain.returncode == 0 and "valid" in plain.stdout.splitlines()[-1]

    exported = tmp_path / "corrupt.pth"
    refused = barlow("export", newest, str(exported), *storage_args, env=env)
    assert refused.returncode == 2 and victim in one_error_line(refused) and not exported.exists()

    rerun = barlow(*train_args(url, endpoint=endpoint))  # the same command, as after a lost node
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(rf"step-000000016 is corrupt and will not be loaded: object {re.escape(victim)}", rerun.stderr)
    assert resumed_step(rerun.stderr) == 12
    assert_same_tensors(read_backbone(url, storage), reference[1])
    assert [(c.step, verify_checkpoint(c.url, storage).valid) for c in list_checkpoints(url, storage)] == [
        (12, True), (16, True)]


def test_no_checkpoint_that_verifies_is_an_error_that_deletes_nothing(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "run")
    run = tmp_path / "run"
    for step in (12, 16):
        flip_bytes(str(run / f"checkpoints/step-{step:09d}/__0_0.distcp"), StorageSpec())
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = barlow(*train_args(str(run)))
    assert result.returncode == 2 and "no checkpoint under" in one_error_line(result)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_diverging_run_stops_at_the_named_step_and_commits_nothing_non_finite(where, request, tmp_path):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        url, endpoint = request.getfixturevalue("s3_bucket") + "/run", server.endpoint_url
    else:
        url, endpoint = str(tmp_path / "run"), None
    storage = storage_of(url, request.getfixturevalue("s3_server") if endpoint else None)
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
    for checkpoint in checkpoints:  # every committed state is finite: export each and look
        out = tmp_path / f"{checkpoint.step}.pth"
        exported = barlow("export", checkpoint.url, str(out), *(["--endpoint-url", endpoint] if endpoint else []))
        assert exported.returncode == 0, exported.stderr
        exported = torch.load(out, weights_only=True).values()
        assert all(torch.isfinite(t).all() for t in exported if t.is_floating_point())

    sane = ["optim.lr_weights=0.2", "optim.lr_biases=0.0048", "optim.warmup_epochs=0", "checkpoint.every_steps=2",
            "checkpoint.allow_changes=[optim.lr_weights,optim.lr_biases]"]
    resumed = barlow(*train_args(url, *sane, endpoint=endpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stderr) == checkpoints[-1].step
    backbone = read_backbone(url, storage)
    assert all(torch.isfinite(t).all() for t in backbone.values() if t.is_floating_point())


def wait_for(predicate, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"the first run ended before {what}: {process.communicate()[1][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_second_run_on_the_same_output_is_refused_and_the_first_loses_nothing(where, request, tmp_path):
    endpoint = request.getfixturevalue("s3_server").endpoint_url if where == "s3" else None
    url = request.getfixturevalue("s3_bucket") + "/run" if where == "s3" else str(tmp_path / "run")
    storage = StorageSpec(endpoint_url=endpoint)
    fs, path = filesystem(url, storage)
    long_enough = "optim.epochs=4"  # 64 steps: still running while the second run starts up, on a fast machine too
    first = subprocess.Popen(
        [str(Path(sys.executable).parent / "barlow"), *train_args(url, long_enough, endpoint=endpoint)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: fs.exists(f"{path}/lease.json"), "its lease", first)
        second = barlow(*train_args(url, long_enough, "run.log_every=2", endpoint=endpoint))
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        line = one_error_line(second)
        assert second.returncode == 2 and "is in use by job" in line and f"pid {first.pid}" in line, line
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    command, *text = fs.cat_file(f"{path}/stats.txt").decode().splitlines()
    lines = [json.loads(line) for line in text]
    assert "run.log_every=2" not in command and [line["step"] for line in lines if "event" not in line] == list(
        range(64))
    assert [line["step"] for line in lines if line.get("event") == "start"] == [0]  # the refused run wrote nothing
    checkpoints = list_checkpoints(url, storage)
    assert [c.step for c in checkpoints] == [60, 64]
    assert len({c.run_id for c in checkpoints}) == 1 and checkpoints[0].run_id
    assert not fs.exists(f"{path}/lease.json")  # given back at the end


def test_a_dead_runs_lease_is_taken_over_with_force(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = dict(run_id=None, job_id="someone-else", host="another-host", pid=1, started="2026-12-02T00:00:00+00:00",
                  heartbeat=time.time(), generation=1, token="t")
    (run / "lease.json").write_text(json.dumps(holder))
    refused = barlow(*train_args(str(run)))
    assert refused.returncode == 2 and "someone-else" in one_error_line(refused)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    forced = barlow(*train_args(str(run)), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "someone-else" in forced.stderr  # the take-over is logged, naming the old holder


def test_resume_refuses_a_changed_recipe_unless_told_and_records_what_changed(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "run")
    run = tmp_path / "run"
    stats_before = (run / "stats.txt").read_text()
    changed = ["optim.epochs=2", "loss.lambd=0.01", "run.seed=3", "augment.grayscale=0.5"]
    refused = barlow(*train_args(str(run), *changed))
    line = one_error_line(refused)
    assert refused.returncode == 2
    for field in ("optim.epochs: 1 -> 2", "loss.lambd: 0.0051 -> 0.01", "run.seed: 0 -> 3",
                  "augment.grayscale: 0.2 -> 0.5"):
        assert field in line, line
    assert (run / "stats.txt").read_text() == stats_before  # refused before anything was written
    assert not (run / "lease.json").exists()  # and the lease given back at once, not left to go stale

    neutral = barlow(*train_args(str(run), "run.log_every=3", "checkpoint.every_steps=5", "data.workers=1"))
    assert neutral.returncode == 0, neutral.stderr[-3000:]  # fields that change no numbers pass

    extended = barlow(*train_args(str(run), "optim.epochs=2", "checkpoint.allow_changes=[optim.epochs]"))
    assert extended.returncode == 0, extended.stderr[-3000:]
    records = [json.loads(line) for line in (run / "stats.txt").read_text().splitlines() if line.startswith("{")]
    assert {"epoch": 1, "step": 16, "resumed_with_changes": {"optim.epochs": [1, 2]}}.items() <= next(
        r for r in records if "resumed_with_changes" in r).items()
    newest = list_checkpoints(str(run), StorageSpec())[-1]
    assert newest.step == 32 and newest.manifest["changes"] == [dict(step=16, field="optim.epochs", old=1, new=2)]


def test_a_run_whose_last_checkpoint_does_not_commit_exits_non_zero_and_exports_nothing(aws_env):
    from tests.support.s3_server import S3Server

    server = S3Server().start()
    try:
        url = server.create_bucket("outage") + "/run"
        storage = StorageSpec(endpoint_url=server.endpoint_url)
        run = subprocess.Popen(
            [str(Path(sys.executable).parent / "barlow"),
             *train_args(url, "storage.retries=0", "optim.epochs=3", endpoint=server.endpoint_url)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for(lambda: any(c.valid for c in list_checkpoints(url, storage)), "its first checkpoint", run)
        server.stop()  # the store goes away for the rest of the run
        _, err = run.communicate(timeout=600)
    finally:
        server.stop()
    assert run.returncode == 3, err[-3000:]
    line = [line for line in err.splitlines() if line.startswith("barlow: ")]
    assert len(line) == 1 and "the checkpoint of step 48 was not committed" in line[0] and "Traceback" not in err
    assert "done:" not in err
