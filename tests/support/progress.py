"""A run's progress as tests write it by hand, and the stubs that stand for what is not here: a synthetic run folder
(stats.txt of two attempts, a lease.json), the Kubernetes API answering with the Volcano Job a dry run renders, and
TorchX's runner answering a job's status. Used by tests/unit/reports/test_progress.py, tests/unit/launch/ and
tests/e2e/test_progress.py."""

from __future__ import annotations

import json
from pathlib import Path

from components.barlowtwins import train as train_component

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



class Runner:
    def __init__(self, status: object):
        self.answer = status
        self.asked: list[str] = []

    def status(self, handle: str) -> object:
        self.asked.append(handle)
        return self.answer
