"""A run's progress read back from its storage (service/reports/progress.py), in process: the states, the ETA and
the numbers of run folders written here, and where a job's run is. `barlow status` and `barlow runs ls` as typed are
tests/e2e/test_progress.py's.

The expected numbers are worked out here from the lines the tests write, never through the code under test. The
Kubernetes lookup of a job's run is fed the Volcano Job that the real dry run renders; the API call itself is stubbed
(there is no cluster here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.barlowtwins import train as train_component
from service.launch.scheduler import BarlowKubernetesScheduler
from service.launch.status import print_status
from service.reports.progress import NoRun, read_progress
from service.spec import StorageSpec

WALL_1, WALL_2 = 1_700_000_000.0, 1_700_010_000.0  # the two attempts' start times


def logged(step: int, loss: float, step_time: float, time_s: int, epoch: int) -> dict:
    return {"epoch": epoch, "step": step, "lr_weights": 0.1, "lr_biases": 0.01, "loss": loss, "time": time_s,
            "loss_on_diag": loss / 2, "loss_off_diag": loss / 2, "step_time": step_time,
            "images_per_s": 256 / step_time, "images_per_s_per_worker": 128 / step_time, "data_wait": 0.1,
            "peak_memory_gib": 1.0, "embedding_std": 0.06}


def start(step: int, wall: float, resumed_from: str | None = None) -> dict:
    return {"event": "start", "step": step, "epoch": step // 5, "total_steps": 20, "steps_per_epoch": 5,
            "world_size": 2, "global_batch": 256, "resumed_from": resumed_from, "wall": wall, "time": 0}


def write_lines(path: Path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def write_synthetic_run(run: Path, second_attempt_steps: int = 7) -> None:
    """20 steps (5 an epoch). Attempt 1 trains steps 0-6 (step time 100 s, loss 999 after the checkpoint), is
    pre-empted after 7 steps with its checkpoint at 5; attempt 2 resumes at 5 and trains steps 5-11 (step times
    10, 20, 29, 31, 30, 28, 32; loss 50 - step; a line every 40 s), the kNN monitor after 10 steps."""
    run.mkdir(parents=True, exist_ok=True)
    first = [logged(step, 60.0 - step, 100.0, 100 * (step + 1), step // 5) for step in range(5)]
    first += [{"event": "checkpoint", "step": 5, "epoch": 1, "url": f"{run}/checkpoints/step-000000005", "time": 500},
              {"epoch": 0, "step": 5, "knn_top1": 11.0, "time": 510},
              logged(5, 999.0, 100.0, 600, 1), logged(6, 999.0, 100.0, 700, 1),
              {"event": "preempted", "step": 7, "epoch": 1, "time": 710}]
    step_times = dict(zip(range(5, 12), [10.0, 20.0, 29.0, 31.0, 30.0, 28.0, 32.0]))
    second: list[dict] = []
    for step in range(5, 5 + second_attempt_steps):
        if step == 10:
            second.append({"epoch": 1, "step": 10, "knn_top1": 42.5, "time": 205})
        second.append(logged(step, 50.0 - step, step_times[step], 40 * (step - 4), step // 5))
    write_lines(run / "stats.txt", ["barlow train a.yaml", start(0, WALL_1), *first,
                                    "barlow train a.yaml", start(5, WALL_2, "ckpt-5"), *second])
    (run / "spec.yaml").write_text("checkpoint:\n  lease_timeout: 60.0\nrun:\n  output: x\n")


def lease(heartbeat: float) -> str:
    return json.dumps({"run_id": "r1", "job_id": "job-7", "host": "node-7", "pid": 4242,
                       "started": "2023-11-14T22:13:20Z", "heartbeat": heartbeat, "generation": 2, "token": "t"})


# stats.txt of write_synthetic_run, worked out by hand: attempt 2 hides attempt 1's lines at steps >= 5 (its loss
# 999, its step time 100, its kNN after 5 steps). Steps 0-11 are trained: 12 done of 20, epoch 12 // 5 = 2; the loss and
# images/s of step 11; the ETA over the 5 newest lines of attempt 2, (20 - 12) x mean(29, 31, 30, 28, 32) = 240 s;
# the last line is step 11's, at attempt 2's start + 280 s.
DONE, TOTAL, EPOCH, LOSS, IMAGES_PER_S, KNN, ETA_S, LAST_LINE = 12, 20, 2, 39.0, 256 / 32, 42.5, 240.0, WALL_2 + 280


def test_progress_of_a_resumed_running_run(tmp_path):
    run = tmp_path / "run"
    write_synthetic_run(run)
    now = LAST_LINE + 30
    (run / "lease.json").write_text(lease(heartbeat=now - 59))  # younger than the spec's timeout, 60 s
    progress = read_progress(str(run), StorageSpec(), now=now)
    assert (progress.state, progress.step, progress.total, progress.epoch) == ("running", DONE, TOTAL, EPOCH)
    assert (progress.loss, progress.images_per_s, progress.knn_top1) == (LOSS, IMAGES_PER_S, KNN)
    assert progress.eta_s == pytest.approx(ETA_S)
    assert progress.updated == LAST_LINE
    assert "job-7 on host node-7 (pid 4242), heartbeat 59 s ago" in progress.detail
    assert progress.checkpoint is None  # none written


def test_eta_just_after_a_resume_uses_only_the_new_attempt(tmp_path):
    """Attempt 2 cut after its step 6: 7 steps done; its two lines (10 s, 20 s) give the step time, not attempt 1's
    100 s lines before the resume: (20 - 7) x 15 s."""
    run = tmp_path / "run"
    write_synthetic_run(run, second_attempt_steps=2)
    (run / "lease.json").write_text(lease(heartbeat=LAST_LINE))
    progress = read_progress(str(run), StorageSpec(), now=LAST_LINE)
    assert (progress.state, progress.step) == ("running", 7)
    assert progress.eta_s == pytest.approx(13 * 15.0)


@pytest.mark.parametrize(("last_line", "lease_age", "state", "detail"), [
    (None, 61, "stopped", "lease.json left by job job-7"),  # heartbeat past the spec's timeout: the holder died
    (None, None, "stopped", "killed or crashed"),
    ({"event": "preempted", "step": 12, "epoch": 2, "time": 330}, None, "preempted", "after step 12"),
    ({"event": "diverged", "step": 11, "epoch": 2, "time": 330}, None, "failed", "non-finite at step 11"),
    ({"event": "end", "step": 12, "epoch": 2, "time": 330}, None, "finished", ""),
])
def test_states_without_a_live_lease(tmp_path, last_line, lease_age, state, detail):
    run = tmp_path / "run"
    write_synthetic_run(run)
    now = LAST_LINE + 100
    if last_line:
        with open(run / "stats.txt", "a") as stats:
            stats.write(json.dumps(last_line) + "\n")
    if lease_age is not None:
        (run / "lease.json").write_text(lease(heartbeat=now - lease_age))
    progress = read_progress(str(run), StorageSpec(), now=now)
    assert progress.state == state and detail in progress.detail
    assert progress.eta_s is None and progress.step == DONE and progress.total == TOTAL


def test_read_progress_of_nothing_is_no_run(tmp_path):
    with pytest.raises(NoRun, match="no run here"):
        read_progress(str(tmp_path), StorageSpec())


class VolcanoApi:
    """CustomObjectsApi's one call here, answering with one job as the API server returns it (JSON)."""

    def __init__(self, job: dict):
        self.job = json.loads(json.dumps(job))
        self.calls: list[dict] = []

    def get_namespaced_custom_object(self, **query):
        self.calls.append(query)
        return self.job


def rendered_job(*arguments: str, spec: str = "specs/digits.yaml") -> dict:
    """The Volcano Job the kubernetes scheduler's dry run renders."""
    from torchx.runner import get_runner

    app = train_component(spec, *arguments)
    return get_runner().dryrun(app, "kubernetes", cfg={}, workspace=None).request.resource


def test_run_location_of_a_rendered_volcano_job(monkeypatch):
    api = VolcanoApi(rendered_job("run.output=s3://bucket/runs/k", "storage.endpoint_url=http://minio:9000",
                                  "storage.region=eu-west-1"))
    monkeypatch.setattr(BarlowKubernetesScheduler, "_custom_objects_api", lambda self: api)
    location = BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x1")
    assert location is not None
    run_url, storage = location
    assert run_url == "s3://bucket/runs/k"
    assert (storage.endpoint_url, storage.region) == ("http://minio:9000", "eu-west-1")
    assert api.calls == [{"group": "batch.volcano.sh", "version": "v1alpha1", "namespace": "barlow", "plural": "jobs",
                          "name": "barlowtwins-x1"}]
    api.job = json.loads(json.dumps(rendered_job("run.output=s3://b/r", spec="image:specs/digits.yaml")))
    assert BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x2") is None  # no BARLOW_SPEC


class Runner:
    def __init__(self, status: object):
        self.answer = status
        self.asked: list[str] = []

    def status(self, handle: str) -> object:
        self.asked.append(handle)
        return self.answer


def test_status_of_a_local_job_points_to_the_run(monkeypatch, capsys):
    monkeypatch.setattr("service.launch.status.get_runner", lambda: Runner("AppStatus: SUCCEEDED"))
    assert print_status("local_cwd://torchx/barlowtwins-abc", StorageSpec()) == 0
    assert capsys.readouterr().out.splitlines() == [
        "AppStatus: SUCCEEDED",
        "the run's progress: barlow status RUN_URL (the job's run.output; the local_cwd scheduler keeps no record "
        "of it)"]
