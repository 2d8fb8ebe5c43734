"""What a run reports about itself (issue 16): the stats lines' new fields against hand computations, and the
TensorBoard event files on S3 read back with tensorboard's own EventAccumulator, a resumed run without duplicates."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.method.loss import barlow_twins_terms
from service.method.model import BarlowTwins
from service.method.optim import build_lars
from service.observe import step_metrics
from service.observe.step_metrics import StepClock, decimated, embedding_std, peak_memory_gib
from service.observe.tensorboard import correlation_colors
from service.runtime.precision import Precision
from service.spec import LossSpec, ModelSpec, StorageSpec
from service.storage.filesystem import filesystem
from service.trainer import training_step
from tests.support.runs import resumed_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ["optim.epochs=1", "optim.batch_size=256", "model.projector=64-64-64", "run.log_every=1",
        "monitor.knn_every_epochs=null"]


def overrides(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def train(settings: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ROOT / ".venv/bin/barlow"), "train", "specs/digits.yaml", *overrides(settings)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def stats_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- the measurements, by hand ---

def test_the_loss_terms_are_the_papers_two_sums_and_add_up_to_the_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    terms = barlow_twins_terms(z1, z2)
    # an independent computation: standardise each view over the batch (biased, as BatchNorm), then C = n1^T n2 / N
    a, b = z1.numpy(), z2.numpy()
    n1 = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    n2 = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = n1.T @ n2 / len(a)
    assert terms.on_diag.item() == pytest.approx(((1 - np.diag(c)) ** 2).sum(), rel=1e-9)
    assert terms.off_diag.item() == pytest.approx((c ** 2).sum() - (np.diag(c) ** 2).sum(), rel=1e-9)

    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="32-32"))
    optimizer = build_lars(model, 1e-6, 0.9, 0.001)
    precision = Precision.choose("fp32", torch.device("cpu"))
    spec = LossSpec(lambd=0.01, scale_loss=0.5)
    output = training_step(model, optimizer, precision.grad_scaler(), precision, spec,
                           torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), observe=True)
    assert (output.on_diag + output.off_diag).item() == pytest.approx(output.loss.item(), rel=1e-6)
    assert output.correlation is not None and output.correlation.shape == (32, 32)
    # the step's terms are those of its correlation matrix, scaled as the loss is (lambd on the off-diagonal)
    c = output.correlation.double()
    assert output.on_diag.item() == pytest.approx(0.5 * ((1 - c.diagonal()) ** 2).sum().item(), rel=1e-5)
    assert output.off_diag.item() == pytest.approx(
        0.5 * 0.01 * ((c ** 2).sum() - (c.diagonal() ** 2).sum()).item(), rel=1e-5)


def test_the_collapse_signal_is_one_over_root_d_when_spread_and_zero_when_collapsed():
    torch.manual_seed(0)
    for dim in (64, 256, 1024):
        spread = embedding_std(torch.randn(4096, dim))
        assert spread.item() == pytest.approx(1 / math.sqrt(dim), rel=0.03)
    one_point = torch.randn(1, 256).repeat(512, 1) + 1e-6 * torch.randn(512, 256)
    assert embedding_std(one_point).item() < 1e-4
    # scaling an embedding does not change it: it is measured on the sphere
    z = torch.randn(512, 128)
    assert embedding_std(7 * z).item() == pytest.approx(embedding_std(z).item(), rel=1e-5)


def test_the_image_keeps_the_diagonal_and_maps_minus_one_zero_one_to_blue_white_red():
    matrix = torch.eye(256) * 0.9 + 0.01
    small = decimated(matrix)
    assert small.shape == (64, 64)
    assert torch.allclose(small.diagonal(), torch.full((64,), 0.91))  # averaging would leave ~0.02 there
    assert small[0, 1].item() == pytest.approx(0.01)
    assert decimated(torch.zeros(10, 10)).shape == (10, 10)
    colors = correlation_colors(np.array([[-1.0, 0.0, 1.0, 5.0]]))
    assert colors.dtype == np.uint8 and colors.shape == (1, 4, 3)
    assert colors[0].tolist() == [[59, 76, 192], [255, 255, 255], [180, 4, 38], [180, 4, 38]]


def test_the_clock_splits_wall_time_into_steps_and_data_wait(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(step_metrics.time, "perf_counter", lambda: now[0])

    def slow_batches():
        for batch in range(3):
            now[0] += 0.5  # the loader takes 0.5 s per batch
            yield batch

    clock = StepClock()
    for _ in clock.timed(slow_batches()):
        now[0] += 1.5  # the step itself
        clock.step_done()
    step_time, data_wait = clock.read()
    assert step_time == pytest.approx(2.0)
    assert data_wait == pytest.approx(0.25)
    now[0] += 4.0  # e.g. the kNN monitor
    clock.restart()
    now[0] += 1.0
    clock.step_done()
    assert clock.read() == (pytest.approx(1.0), pytest.approx(0.0))


def test_peak_memory_on_the_cpu_covers_what_the_process_held():
    held = torch.ones(2**28 // 4 * 3)  # 0.75 GiB of float32, touched
    assert float(held[-1]) == 1.0
    assert peak_memory_gib(torch.device("cpu")) >= 0.75


@pytest.mark.slow
def test_a_tiny_run_logs_every_field_consistent_with_its_times(tmp_path):
    run = tmp_path / "run"
    train([*TINY, f"run.output={run}", "run.image_every=2"])
    lines = stats_lines((run / "stats.txt").read_text())
    start, *steps, checkpoint, end = lines
    assert start["event"] == "start" and start["step"] == 0 and start["world_size"] == 1
    assert start["total_steps"] == 4 and start["global_batch"] == 256 and start["resumed_from"] is None
    assert [line["step"] for line in steps] == [0, 1, 2, 3]
    assert checkpoint["event"] == "checkpoint" and checkpoint["step"] == 4 and end == {**end, "event": "end", "step": 4}
    for line in steps:
        assert list(line)[:6] == ["epoch", "step", "lr_weights", "lr_biases", "loss", "time"]  # the reference's
        assert line["loss_on_diag"] + line["loss_off_diag"] == pytest.approx(line["loss"], rel=1e-5)
        assert line["images_per_s"] * line["step_time"] == pytest.approx(256, rel=1e-6)
        assert line["images_per_s_per_worker"] == pytest.approx(line["images_per_s"])
        assert 0 <= line["data_wait"] < 1 and line["peak_memory_gib"] > 0.1
        assert 0 < line["embedding_std"] <= 1 / math.sqrt(64) * 1.5
    # the step times account for the attempt's wall time: they add up to the last line's `time` (whole seconds
    # since the start, which also holds the set-up before the first step)
    total = sum(line["step_time"] for line in steps)
    assert steps[-1]["time"] - 3 <= total <= steps[-1]["time"] + 1


# --- TensorBoard on S3 ---

def read_events(fs, url_path: str, folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder.mkdir()
    for name in fs.ls(url_path, detail=False):
        fs.get_file(name, str(folder / Path(name).name))
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_event_files_on_s3_hold_the_scalars_and_the_image_and_a_resume_leaves_no_duplicate(
        s3_bucket, s3_server, tmp_path):
    run = f"{s3_bucket}/run"
    settings = [*TINY, f"run.output={run}", f"storage.endpoint_url={s3_server.endpoint_url}",
                "checkpoint.every_steps=2", "run.image_every=2"]
    train(settings)
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    fs, path = filesystem(run, storage)
    first = read_events(fs, f"{path}/tensorboard", tmp_path / "first")
    first_losses = {event.step: event.value for event in first.Scalars("loss/total")}
    assert sorted(first_losses) == [0, 1, 2, 3]
    # the node is lost before its last checkpoint reached the store: the rerun resumes from step 2 and trains
    # steps 2 and 3 again, whose first events are already uploaded
    fs.rm(f"{path}/checkpoints/step-000000004", recursive=True)
    resumed = train(settings)
    assert resumed_step(resumed.stderr) == 2

    events = read_events(fs, f"{path}/tensorboard", tmp_path / "resumed")
    stats = stats_lines(fs.cat_file(f"{path}/stats.txt").decode())
    logged = {}
    for line in stats:  # the stats lines that still hold: the resumed attempt's from its step on
        if line.get("event") == "start":
            logged = {step: value for step, value in logged.items() if step < line["step"]}
        elif "loss" in line:
            logged[line["step"]] = line
    assert sorted(logged) == [0, 1, 2, 3]
    for name, tag in (("loss", "loss/total"), ("loss_on_diag", "loss/on_diag"), ("loss_off_diag", "loss/off_diag"),
                      ("lr_weights", "lr/weights"), ("images_per_s", "throughput/images_per_s"),
                      ("data_wait", "throughput/data_wait"), ("peak_memory_gib", "memory/peak_gib"),
                      ("embedding_std", "collapse/embedding_std")):
        scalars = events.Scalars(tag)
        steps = [event.step for event in scalars]
        assert steps == sorted(set(steps)) == [0, 1, 2, 3], (tag, steps)  # no step twice
        assert [event.value for event in scalars] == pytest.approx([logged[s][name] for s in steps], rel=1e-6)
    images = events.Images("cross_correlation")
    assert [image.step for image in images] == [0, 2]
    pixels = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")).astype(float)
    assert pixels.shape == (64, 64, 3)  # D = 64: the whole matrix, nothing decimated
    # the colours read back as C (blue -1, white 0, red +1, linear) give the logged invariance term of that step
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    c = np.where(red >= blue, (255 - green) / (255 - 4), (green - 255) / (255 - 76))
    assert ((1 - c.diagonal()) ** 2).sum() == pytest.approx(logged[2]["loss_on_diag"], rel=0.01)
    assert fs.exists(f"{path}/spec.yaml") and not [p for p in fs.ls(f"{path}/tensorboard") if p.endswith(".tmp")]
