"""barlow report (issue 16) as a user types it: the page of a real 2-worker run on S3, resumed once (the shared
resumed run, tests/e2e/conftest.py), opened in headless Chromium; a run on S3, pre-empted and resumed on another world
size; a missing run. The figures' data are compared with stats.txt read here independently of the service's reader
(a start event at step S supersedes the earlier lines from S on). The newest image a resume kept is
tests/integration/test_report.py's."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.integration.test_report import FIGURES, figure_data, preempted_and_resumed_stats
from tests.support.browser import open_page
from tests.support.runs import S3_ENV, run_barlow

UNITS = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0}
# where a page names something the browser would fetch: src= and href= attributes, CSS url(...) and @import
RESOURCE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])([^"'\s>)]+)""")
STEP_FIELDS = {"loss": ["loss", "loss_on_diag", "loss_off_diag"], "lr": ["lr_weights", "lr_biases"],
               "throughput": ["images_per_s", "data_wait"], "memory": ["peak_memory_gib"],
               "collapse": ["embedding_std"]}


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
    return run_barlow("report", run, "-o", str(out), *extra, env=S3_ENV, timeout=300)


@pytest.mark.browser
def test_the_report_of_a_resumed_two_worker_run_renders_every_figure_with_the_runs_numbers(resumed_run, aws_env,
                                                                                            tmp_path):
    """The shared resumed run (tests/e2e/conftest.py): 2 workers on S3, its last checkpoint lost, resumed from
    step 12, which trained steps 12-15 again."""
    run = resumed_run.url
    written = report(run, tmp_path / "report.html", "--endpoint-url", resumed_run.endpoint)
    assert written.returncode == 0, written.stderr
    assert written.stdout.startswith(
        f"wrote {tmp_path / 'report.html'}: 8 figures of {run} (16 of 16 steps done, loss")
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

    stats = resumed_run.read("stats.txt").decode()
    data = figure_data(page.dom)
    assert set(data) == FIGURES
    assert_figures_equal_stats(data, stats)
    steps = data["loss"]["series"]["loss"]["x"]
    assert steps == list(range(16))  # steps 12-15 once each, the resumed attempt's
    _, _, starts = expected_lines(stats)
    assert [start["step"] for start in starts] == [0, 12] and [s["world_size"] for s in starts] == [2, 2]
    kinds = [event["kind"] for event in data["loss"]["events"]]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and "checkpoint" in kinds
    assert [event["kind"] for event in data["timeline"]["events"]][-1] == "end"
    assert data["correlation"]["step"] == 14 and data["correlation"]["shape"] == [64, 64, 3]  # the newest image
    assert "projector: 64-64" in page.dom


def test_a_run_on_s3_is_reported_and_a_missing_one_is_one_line(s3_bucket, s3_server, tmp_path):
    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    fs, path = filesystem(f"{s3_bucket}/runs/a", storage)
    stats = preempted_and_resumed_stats()
    fs.pipe_file(f"{path}/stats.txt", stats.encode())
    fs.pipe_file(f"{path}/spec.yaml", b"model:\n  projector: 16-16\n")
    out = tmp_path / "a.html"
    written = report(f"{s3_bucket}/runs/a", out, "--endpoint-url", s3_server.endpoint_url)
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

    missing = report(f"{s3_bucket}/runs/none", tmp_path / "b.html", "--endpoint-url", s3_server.endpoint_url)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert f"{s3_bucket}/runs/none" in missing.stderr and not (tmp_path / "b.html").exists()


