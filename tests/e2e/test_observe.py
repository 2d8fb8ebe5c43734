"""What a real run reports about itself (issue 16): the stats lines' fields of the shared tiny run, consistent
with its times, and the TensorBoard event files on S3 of the shared resumed run, read back with tensorboard's own
EventAccumulator: every step once, although the resume trained steps 12-15 a second time (tests/e2e/conftest.py)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.storage.filesystem import filesystem
from tests.support.runs import events, logged_steps


def test_a_tiny_run_logs_every_field_consistent_with_its_times(tiny_run, aws_env):
    records = tiny_run.records()
    happened = events(records)
    start = happened[0]
    assert start["event"] == "start" and start["step"] == 0 and start["world_size"] == 2
    assert start["total_steps"] == 16 and start["global_batch"] == 64 and start["resumed_from"] is None
    assert happened[-2:] == [{**happened[-2], "event": "checkpoint", "step": 16},
                             {**happened[-1], "event": "end", "step": 16}]
    steps = logged_steps(records)
    assert [line["step"] for line in steps] == list(range(16))
    for line in steps:
        assert list(line)[:6] == ["epoch", "step", "lr_weights", "lr_biases", "loss", "time"]  # the reference's
        assert line["loss_on_diag"] + line["loss_off_diag"] == pytest.approx(line["loss"], rel=1e-5)
        assert line["images_per_s"] * line["step_time"] == pytest.approx(64, rel=1e-6)  # the global batch
        assert line["images_per_s_per_worker"] == pytest.approx(line["images_per_s"] / 2)
        assert 0 <= line["data_wait"] < 1 and line["peak_memory_gib"] > 0.1
        assert 0 < line["embedding_std"] <= 1 / math.sqrt(64) * 1.5
        # the cross-correlation's mean |C_ii| and |C_ij|: the image's matrix (D = 64) read as numbers
        assert 0 < line["correlation_diagonal"] <= 1 and 0 < line["correlation_off_diagonal"] <= 1
        # sum_i (1 - C_ii)^2 >= D (1 - mean|C_ii|)^2 (Jensen, |C_ii| >= C_ii): the logged term bounds the mean
        assert line["loss_on_diag"] >= 64 * (1 - line["correlation_diagonal"]) ** 2 * (1 - 1e-5)
        assert "rankme" not in line  # the kNN monitor is on: its pass gives RankMe
    # the step times account for the attempt's wall time (checkpoints and uploads between steps included; the kNN
    # monitor comes after the last): they add up to the last line's `time` (whole seconds since the start, which
    # also holds the set-up before the first step)
    total = sum(line["step_time"] for line in steps)
    assert steps[-1]["time"] - 3 <= total <= steps[-1]["time"] + 1


def test_with_the_monitor_off_each_logged_step_gives_rankme_of_its_batch(local_run):
    """The shared local run (1 worker, batch 64, the monitor off): RankMe of the step's first-view features, at
    most the 64 rows of the batch (ResNet-18's 512 dimensions are not the bound here)."""
    steps = logged_steps(local_run.records())
    assert [line["step"] for line in steps] == list(range(16))
    assert all(line["rankme_sample"] == 64 and 1 < line["rankme"] <= 64 for line in steps), steps


def read_events(fs, url_path: str, folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder.mkdir()
    for name in fs.ls(url_path, detail=False):
        fs.get_file(name, str(folder / Path(name).name))
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_event_files_on_s3_hold_the_scalars_and_the_images_and_a_resume_leaves_no_duplicate(
        tiny_run, resumed_run, aws_env, tmp_path):
    fs, path = filesystem(resumed_run.url, resumed_run.storage)
    # the run copied before the resume had uploaded its events of steps 12-15, which the resume trains again
    _, first = filesystem(tiny_run.url, tiny_run.storage)
    first_losses = read_events(fs, f"{first}/tensorboard", tmp_path / "first").Scalars("loss/total")
    assert sorted(event.step for event in first_losses) == list(range(16))

    events = read_events(fs, f"{path}/tensorboard", tmp_path / "resumed")
    logged = {}
    for line in resumed_run.records():  # the stats lines that still hold: the resumed attempt's from its step on
        if line.get("event") == "start":
            logged = {step: value for step, value in logged.items() if step < line["step"]}
        elif "loss" in line:
            logged[line["step"]] = line
    assert sorted(logged) == list(range(16))
    for name, tag in (("loss", "loss/total"), ("loss_on_diag", "loss/on_diag"), ("loss_off_diag", "loss/off_diag"),
                      ("lr_weights", "lr/weights"), ("images_per_s", "throughput/images_per_s"),
                      ("data_wait", "throughput/data_wait"), ("peak_memory_gib", "memory/peak_gib"),
                      ("embedding_std", "collapse/embedding_std"),
                      ("correlation_diagonal", "collapse/correlation_diagonal"),
                      ("correlation_off_diagonal", "collapse/correlation_off_diagonal")):
        scalars = events.Scalars(tag)
        steps = [event.step for event in scalars]
        assert steps == sorted(set(steps)) == list(range(16)), (tag, steps)  # no step twice
        assert [event.value for event in scalars] == pytest.approx([logged[s][name] for s in steps], rel=1e-6)
    # the kNN monitor's pass (after the epoch, step 16) logs RankMe beside the accuracy, under collapse/
    monitor = [line for line in resumed_run.records() if "knn_top1" in line][-1]  # the resumed attempt's
    assert [(event.step, event.value) for event in events.Scalars("collapse/rankme")] == \
        [(16, pytest.approx(monitor["rankme"], rel=1e-6))]
    images = events.Images("cross_correlation")
    assert [image.step for image in images] == list(range(0, 16, 2))
    redrawn = images[-2]  # step 12's, drawn again by the resumed attempt
    assert redrawn.step == 12
    pixels = np.asarray(Image.open(io.BytesIO(redrawn.encoded_image_string)).convert("RGB")).astype(float)
    assert pixels.shape == (64, 64, 3)  # D = 64: the whole matrix, nothing decimated
    # the colours read back as C (blue -1, white 0, red +1, linear) give the logged invariance term of that step
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    c = np.where(red >= blue, (255 - green) / (255 - 4), (green - 255) / (255 - 76))
    assert ((1 - c.diagonal()) ** 2).sum() == pytest.approx(logged[12]["loss_on_diag"], rel=0.01)
    assert fs.exists(f"{path}/spec.yaml") and not [p for p in fs.ls(f"{path}/tensorboard") if p.endswith(".tmp")]
