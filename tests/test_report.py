"""barlow report (issue 16): the page of a real 2-worker run, resumed once, opened in headless Chromium; a run on
S3, pre-empted and resumed on another world size; the newest cross-correlation image a resume kept; a missing run.
The figures' data are compared with stats.txt read here independently of the service's reader (a start event at
step S supersedes the earlier lines from S on)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.observe.report import write_report
from service.observe.stats import CORRELATION_TAG
from service.observe.tensorboard import POSITIVE, ZERO, EventFiles, correlation_colors
from service.spec import StorageSpec
from service.storage.filesystem import StorageError, filesystem
from tests.support.browser import open_page
from tests.support.runs import resumed_step

ROOT = Path(__file__).resolve().parents[1]
BARLOW = str(ROOT / ".venv/bin/barlow")
FIGURES = {"loss", "lr", "knn", "throughput", "memory", "collapse", "timeline", "correlation"}
UNITS = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0}
# where a page names something the browser would fetch: src= and href= attributes, CSS url(...) and @import
RESOURCE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])([^"'\s>)]+)""")
STEP_FIELDS = {"loss": ["loss", "loss_on_diag", "loss_off_diag"], "lr": ["lr_weights", "lr_biases"],
               "throughput": ["images_per_s", "data_wait"], "memory": ["peak_memory_gib"],
               "collapse": ["embedding_std"]}


def figure_data(page: str) -> dict[str, dict]:
    found = re.findall(r'<script type="application/json" class="figure-data" data-figure="([a-z]+)">(.*?)</script>',
                       page, flags=re.DOTALL)
    return {name: json.loads(text.replace("<\\/", "</")) for name, text in found}


def expected_lines(stats: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(logged steps, kNN lines, start events) that still hold after the resumes; each line's unix time in "_wall"."""
    kept: list[dict] = []
    starts = []
    for raw in stats.splitlines():
        if not raw.startswith("{"):
            continue
        line = json.loads(raw)
        if line.get("event") == "start":
            starts.append(line)
            # a logged step's `step` is the step it trained; the other lines' the steps completed before them
            kept = [old for old in kept if old["step"] < line["step"] + ("lr_weights" not in old)]
        else:
            kept.append({**line, "_wall": starts[-1]["wall"] + line["time"]})
    return [line for line in kept if "lr_weights" in line], [line for line in kept if "knn_top1" in line], starts


def assert_figures_equal_stats(data: dict[str, dict], stats: str) -> None:
    steps, knn, starts = expected_lines(stats)
    for figure, fields in STEP_FIELDS.items():
        for field in fields:
            series = data[figure]["series"][field]
            assert series["x"] == [line["step"] for line in steps], (figure, field)
            assert series["y"] == [line[field] for line in steps], (figure, field)
    assert data["knn"]["series"]["knn_top1"] == {"x": [line["step"] for line in knn],
                                                 "y": [line["knn_top1"] for line in knn]}
    timeline = data["timeline"]
    origin = min(start["wall"] for start in starts)
    assert timeline["origin"] == origin
    assert timeline["series"]["step"] == {"x": [(line["_wall"] - origin) / UNITS[timeline["unit"]] for line in steps],
                                          "y": [line["step"] for line in steps]}


def fetched_urls(page: str) -> list[str]:
    """The URLs a browser would fetch to show the page: none may leave it (data: URIs and #fragments)."""
    return [url for url in RESOURCE.findall(page) if not url.startswith(("data:", "#"))]


def report(run: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BARLOW, "report", run, "-o", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_report_of_a_resumed_two_worker_run_renders_every_figure_with_the_runs_numbers(tmp_path):
    run = tmp_path / "run"
    settings = ["optim.epochs=2", "optim.batch_size=256", "model.projector=64-64-64", "run.log_every=1",
                "run.image_every=2", "monitor.knn_every_epochs=1", "checkpoint.every_steps=3", f"run.output={run}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "service",
               "train", "specs/digits.yaml", *[arg for setting in settings for arg in ("--set", setting)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    # the node died before its last checkpoint was stored: the rerun resumes from step 6 and trains 6 and 7 again
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step-000000006", "step-000000008"]
    shutil.rmtree(run / "checkpoints" / "step-000000008")
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert resumed_step(second.stderr) == 6

    written = report(str(run), tmp_path / "report.html")
    assert written.returncode == 0, written.stderr
    assert written.stdout.startswith(f"wrote {tmp_path / 'report.html'}: 8 figures of {run} (8 of 8 steps done, loss")
    page = open_page(tmp_path / "report.html", tmp_path / "browser")
    assert page.console_errors == []
    assert page.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.screenshot.stat().st_size > 50_000
    drawn = dict(re.findall(r'<figure id="fig-([a-z]+)">(.*?)</figure>', page.dom, flags=re.DOTALL))
    assert set(drawn) == FIGURES
    assert all("<svg" in figure and "<path" in figure for figure in drawn.values())
    assert fetched_urls(page.dom) == []  # nothing to fetch at view time

    # the checks above see a broken page: a script that throws, an image that would be fetched
    broken = tmp_path / "broken.html"
    bad_image = '<img src="http://127.0.0.1:9/missing.png">'
    broken.write_text((tmp_path / "report.html").read_text().replace(
        "</body>", f"<script>throw new Error('deliberately broken');</script>{bad_image}</body>"))
    broken_page = open_page(broken, tmp_path / "browser")
    assert any("deliberately broken" in error for error in broken_page.console_errors), broken_page.console_errors
    assert any("127.0.0.1:9" in error for error in broken_page.console_errors), broken_page.console_errors
    assert fetched_urls(broken_page.dom) == ["http://127.0.0.1:9/missing.png"]

    stats = (run / "stats.txt").read_text()
    data = figure_data(page.dom)
    assert set(data) == FIGURES
    assert_figures_equal_stats(data, stats)
    steps = data["loss"]["series"]["loss"]["x"]
    assert steps == list(range(8))  # steps 6 and 7 once each, the resumed attempt's
    _, _, starts = expected_lines(stats)
    assert [start["step"] for start in starts] == [0, 6] and [s["world_size"] for s in starts] == [2, 2]
    kinds = [event["kind"] for event in data["loss"]["events"]]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and "checkpoint" in kinds
    assert [event["kind"] for event in data["timeline"]["events"]][-1] == "end"
    assert data["correlation"]["step"] == 6 and data["correlation"]["shape"] == [64, 64, 3]
    assert "projector: 64-64-64" in page.dom


def preempted_and_resumed_stats() -> str:
    """stats.txt of 4 steps on 1 worker, pre-empted after 2, resumed 10 minutes later on 2 workers at step 2."""
    lines = [{"event": "start", "step": 0, "epoch": 0, "total_steps": 4, "steps_per_epoch": 2, "world_size": 1,
              "global_batch": 8, "resumed_from": None, "wall": 1_700_000_000.0, "time": 0}]
    lines += [{"epoch": step // 2, "step": step, "lr_weights": 0.1 * step, "lr_biases": 0.01, "loss": 10.0 - step,
               "time": step, "loss_on_diag": 9.0 - step, "loss_off_diag": 1.0, "step_time": 1.0, "images_per_s": 8.0,
               "images_per_s_per_worker": 8.0, "data_wait": 0.1, "peak_memory_gib": 1.5, "embedding_std": 0.1}
              for step in range(3)]
    lines += [{"event": "preempted", "step": 2, "epoch": 1, "time": 3}]
    lines += [{**lines[0], "step": 2, "epoch": 1, "world_size": 2, "wall": 1_700_000_600.0}]
    lines += [{**lines[3], "step": 2, "loss": 5.0, "loss_on_diag": 4.0}]
    return "barlow train x\n" + "\n".join(json.dumps(line) for line in lines) + "\n"


def test_a_run_on_s3_is_reported_and_a_missing_one_is_one_line(s3_bucket, s3_server, tmp_path):
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    fs, path = filesystem(f"{s3_bucket}/runs/a", storage)
    stats = preempted_and_resumed_stats()
    fs.pipe_file(f"{path}/stats.txt", stats.encode())
    fs.pipe_file(f"{path}/spec.yaml", b"model:\n  projector: 16-16\n")
    env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    out = tmp_path / "a.html"
    written = subprocess.run([BARLOW, "report", f"{s3_bucket}/runs/a", "-o", str(out), "--endpoint-url",
                              s3_server.endpoint_url], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert written.returncode == 0, written.stderr
    page = out.read_text()
    data = figure_data(page)
    assert set(data) == FIGURES - {"correlation"} and 'id="no-correlation"' in page
    assert_figures_equal_stats(data, stats)
    assert data["loss"]["series"]["loss"]["y"] == [10.0, 9.0, 5.0]  # step 2 of the resumed attempt
    assert [event["kind"] for event in data["loss"]["events"]] == ["start", "preempted", "world size"]
    # the downtime between the pre-emption (3 s in) and the resume (600 s after the start) is on the time axis
    assert [event["wall"] for event in data["timeline"]["events"]] == [1_700_000_000.0, 1_700_000_003.0,
                                                                       1_700_000_600.0]
    assert data["timeline"]["unit"] == "minutes"
    assert data["timeline"]["series"]["step"]["x"][-1] == pytest.approx(602 / 60)

    missing = subprocess.run([BARLOW, "report", f"{s3_bucket}/runs/none", "-o", str(tmp_path / "b.html"),
                              "--endpoint-url", s3_server.endpoint_url], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert f"{s3_bucket}/runs/none" in missing.stderr and not (tmp_path / "b.html").exists()


def test_the_heatmap_is_the_newest_image_that_a_resume_kept_and_a_folder_without_stats_is_refused(
        s3_bucket, s3_server, tmp_path):
    """Run a drew images at steps 0 and 2, run b at step 2 only; both resumed from step 2 and pre-empted again before
    drawing one: a keeps step 0's, b has none left."""
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    runs = {f"{s3_bucket}/runs/a": [0, 2], f"{s3_bucket}/runs/b": [2]}
    for run, steps in runs.items():
        fs, path = filesystem(run, storage)
        fs.pipe_file(f"{path}/stats.txt", preempted_and_resumed_stats().encode())
        first = EventFiles(run, storage, purge_step=None)
        for step in steps:  # +1 on the diagonal at step 0, -1 at step 2
            first.image(step, CORRELATION_TAG, correlation_colors(np.eye(16) * (1 - step)))
        first.close()
    time.sleep(1.1)  # event files are ordered by the whole seconds in their names: the resumes' come after
    for run in runs:
        resumed = EventFiles(run, storage, purge_step=2)
        resumed.scalars(2, {"loss/total": 5.0})
        resumed.close()

    a, b = (str(tmp_path / f"{name}.html") for name in "ab")
    assert write_report(f"{s3_bucket}/runs/a", a, storage) == (
        f"wrote {a}: 8 figures of {s3_bucket}/runs/a (3 of 4 steps done, loss 5 at step 2)")
    heatmap = figure_data(Path(a).read_text())["correlation"]
    assert heatmap["step"] == 0 and heatmap["shape"] == [16, 16, 3]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"]))))
    assert tuple(pixels[0, 0]) == POSITIVE and tuple(pixels[0, 1]) == ZERO  # step 0's: +1 on the diagonal
    assert write_report(f"{s3_bucket}/runs/b", b, storage).startswith(f"wrote {b}: 7 figures")
    assert 'id="no-correlation"' in Path(b).read_text()

    with pytest.raises(StorageError, match="no stats.txt"):
        write_report(str(tmp_path), str(tmp_path / "c.html"), storage)
