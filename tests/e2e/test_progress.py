"""`barlow status` and `barlow runs ls` as a user types them: a run's progress read back from its storage
(service/reports/progress.py), of a run folder written here, of the shared tiny run on S3 (tests/e2e/conftest.py)
and of copies of it, and of a Kubernetes job whose run is on S3.

The expected numbers are worked out from the lines the tests write (tests/unit/reports/test_progress.py), or read
from the JSON lines of the real run's stats.txt, never through the code under test. The Kubernetes lookup of a job's
run is fed the Volcano Job that the real dry run renders; the API call itself is stubbed (there is no cluster here).
"""

from __future__ import annotations

import json
import time

import pytest

from service.launch.status import print_status
from service.launch.volcano import BarlowKubernetesScheduler
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.progress import Runner, VolcanoApi, lease, rendered_job, write_synthetic_run
from tests.support.runs import S3_ENV, copy_tree, events, logged_steps, run_barlow

FINISHED = 16  # the shared tiny run: one epoch of 16 steps, checkpoints 12 and 16 kept


def barlow_s3(s3_server, *arguments: str):
    return run_barlow(*arguments, "--endpoint-url", s3_server.endpoint_url, env=S3_ENV, timeout=120)


def shown(stdout: str) -> dict[str, str]:
    """`barlow status`'s lines by their name."""
    return dict(line.split(None, 1) for line in stdout.replace("kNN top-1", "kNN").replace("last line", "last")
                .splitlines())


def test_barlow_status_of_a_run_folder(tmp_path):
    """Through the executable the user types: the state, step of total, loss, kNN, images/s, ETA."""
    run = tmp_path / "run"
    write_synthetic_run(run)
    (run / "lease.json").write_text(lease(heartbeat=time.time()))
    result = run_barlow("status", str(run), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = shown(result.stdout)
    assert lines["state"].startswith("running: job job-7")
    assert lines["step"] == "12/20 (60%), epoch 2"
    assert (lines["loss"], lines["kNN"], lines["images/s"], lines["ETA"]) == ("39", "42.5%", "8", "4m00s")
    assert lines["last"].startswith("2023-11-15 01:04:40Z (")  # WALL_2 + 280 s: 1,700,000,000 is 22:13:20 UTC


def test_barlow_status_of_a_finished_real_run(tiny_run, aws_env):
    records = tiny_run.records()
    last_logged = logged_steps(records)[-1]
    last_knn = [line for line in records if "knn_top1" in line][-1]
    (started,) = [line for line in events(records) if line["event"] == "start"]
    result = run_barlow("status", tiny_run.url, "--endpoint-url", tiny_run.endpoint, env=S3_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    status = shown(result.stdout)
    assert status["state"] == "finished"
    assert status["step"] == "16/16 (100%), epoch 1"  # 1 epoch of 16 steps
    assert status["loss"] == f"{last_logged['loss']:.4g}" and last_logged["step"] == 15
    assert status["kNN"] == f"{last_knn['knn_top1']:.1f}%" and last_knn["step"] == 16
    assert status["images/s"] == f"{last_logged['images_per_s']:.4g}"
    assert status["ETA"] == "-"
    newest = f"{tiny_run.url}/checkpoints/step-000000016"
    created = json.loads(tiny_run.read("checkpoints/step-000000016/manifest.json"))["created"]
    assert status["checkpoint"] == f"step 16, {newest}, created {created}"
    last_time = time.gmtime(started["wall"] + records[-1]["time"])
    assert status["last"].startswith(f"{time.strftime('%Y-%m-%d %H:%M:%SZ', last_time)}")


def copy_of_the_tiny_run(tiny_run, url: str, *skip: str) -> None:
    """The shared run's files (no backbone, no event files, nor `skip`) copied to `url` on the same S3 server."""
    fs, source = filesystem(tiny_run.url, tiny_run.storage)
    copy_tree(fs, source, filesystem(url, tiny_run.storage)[1], skip=("resnet18.pth", "tensorboard", *skip))


def test_runs_ls_on_s3_a_finished_and_a_running_run(tiny_run, s3_server, s3_bucket):
    """runs/b-finished is the shared tiny run; runs/a-running is the same run cut after its step 13 line, with its
    step 12 checkpoint and a lease.json whose heartbeat is fresh. Its last line is older: it comes second, not by
    name."""
    fs, _ = filesystem(s3_bucket, tiny_run.storage)
    copy_of_the_tiny_run(tiny_run, f"{s3_bucket}/runs/b-finished")
    running = f"{s3_bucket}/runs/a-running"
    copy_of_the_tiny_run(tiny_run, running, "checkpoints/step-000000016", "stats.txt")
    text = tiny_run.read("stats.txt").decode().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(text) if line.startswith("{") and json.loads(line).get("step") == 13) + 1
    fs.pipe_file(f"{running}/stats.txt", "".join(text[:cut]).encode())
    fs.pipe_file(f"{running}/lease.json", lease(heartbeat=time.time()).encode())
    fs.pipe_file(f"{s3_bucket}/runs/notes/readme.txt", b"not a run")

    result = barlow_s3(s3_server, "runs", "ls", f"{s3_bucket}/runs")
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("  ") for line in result.stdout.splitlines()]
    header = [cell.strip() for cell in header if cell.strip()]
    table = [dict(zip(header, [cell.strip() for cell in row if cell.strip()])) for row in rows]
    assert [row["RUN"] for row in table] == [f"{s3_bucket}/runs/b-finished", running]
    finished, live = table
    records = tiny_run.records()
    assert (finished["STATE"], finished["STEP"], finished["ETA"], finished["CHECKPOINT"]) == (
        "finished", "16/16", "-", "16")
    assert finished["KNN"] == f"{[line for line in records if 'knn_top1' in line][-1]['knn_top1']:.1f}%"
    cut_lines = [json.loads(line) for line in text[:cut] if line.startswith("{")]
    times = [line["step_time"] for line in cut_lines if "step_time" in line][-5:]  # steps 9-13
    eta = round((16 - 14) * sum(times) / len(times))  # 14 steps done of 16
    assert (live["STATE"], live["STEP"], live["EPOCH"], live["CHECKPOINT"]) == ("running", "14/16", "0", "12")
    assert live["ETA"] == (f"{eta // 60}m{eta % 60:02d}s" if eta >= 60 else f"{eta}s")
    assert live["LOSS"] == f"{[line for line in cut_lines if 'loss' in line][-1]['loss']:.4g}"
    assert live["KNN"] == "-"  # the monitor runs after the epoch

    empty = barlow_s3(s3_server, "runs", "ls", f"{s3_bucket}/nothing-here")
    assert (empty.returncode, empty.stdout) == (0, f"no runs under {s3_bucket}/nothing-here\n")


@pytest.mark.parametrize(("arguments", "cause", "typed"), [
    (["status", "{tmp}/nope"], "no run here", True),
    (["runs", "ls", "{tmp}/nope"], "no such folder", False),
    (["status", "{bucket}/runs/nope"], "no run here", False),
    (["status", "s3://no-such-bucket/runs/x"], "the bucket or folder does not exist", True),
    (["runs", "ls", "s3://no-such-bucket/runs"], "the bucket or folder does not exist", False),
    (["status", "local_cwd://torchx/barlowtwins-none"], "no such job", False),
])
def test_a_missing_run_or_bucket_is_one_line_and_exit_2(s3_server, s3_bucket, tmp_path, capsys, arguments, cause,
                                                        typed):
    """Through service.cli.main.main, the executable's entry point, and (`typed`) through the executable too."""
    from service.cli.main import main

    arguments = [argument.format(tmp=tmp_path, bucket=s3_bucket) for argument in arguments]
    results = [(main([*arguments, "--endpoint-url", s3_server.endpoint_url]), *capsys.readouterr())]
    if typed:
        result = barlow_s3(s3_server, *arguments)
        results.append((result.returncode, result.stdout, result.stderr))
    for code, out, err in results:
        assert code == 2 and out == "", (arguments, code, out, err)
        assert err.count("\n") == 1 and err.startswith("barlow: ") and cause in err, (arguments, err)


def test_status_of_a_kubernetes_job_reads_its_run_on_s3(tiny_run, s3_server, s3_bucket, monkeypatch, capsys):
    """The job's own storage settings (its endpoint) reach the run; nothing is given on the command line."""
    copy_of_the_tiny_run(tiny_run, f"{s3_bucket}/runs/k8s")
    api = VolcanoApi(rendered_job(f"run.output={s3_bucket}/runs/k8s",
                                  f"storage.endpoint_url={s3_server.endpoint_url}"))
    not_started = VolcanoApi(rendered_job(f"run.output={s3_bucket}/runs/not-yet",
                                          f"storage.endpoint_url={s3_server.endpoint_url}")).job
    runner = Runner("AppStatus: RUNNING")
    monkeypatch.setattr("service.launch.status.get_runner", lambda: runner)
    monkeypatch.setattr(BarlowKubernetesScheduler, "_custom_objects_api", lambda self: api)
    handle = "kubernetes://torchx/barlow:barlowtwins-k1"
    assert print_status(handle, StorageSpec()) == 0
    out = capsys.readouterr().out.splitlines()
    assert runner.asked == [handle] and out[0] == "AppStatus: RUNNING"
    assert out[1] == f"run         {s3_bucket}/runs/k8s" and out[2] == "state       finished"
    assert api.calls[0]["name"] == "barlowtwins-k1" and api.calls[0]["namespace"] == "barlow"

    api.job = not_started
    assert print_status(handle, StorageSpec()) == 0
    assert capsys.readouterr().out.splitlines()[1] == (f"{s3_bucket}/runs/not-yet: nothing written yet (the job has "
                                                       "not started training)")
