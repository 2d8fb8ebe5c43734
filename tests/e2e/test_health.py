"""The report's health verdict on real runs (issue 32): a run made to collapse on purpose is judged collapsed, the
same recipe left alone healthy. The demo is judged in tests/e2e/test_demo.py.

How the run is made to collapse: LARS's trust coefficient raised from the reference's 0.001 to 10 with no warm-up
(`optim.eta=10 optim.warmup_epochs=0`). Each step then moves a layer's weights by about lr x eta x ||w|| = 0.05 x 10 =
half their norm (with momentum, several times it): far too large a learning rate, the usual cause of collapse in
practice. After one epoch of the tiny recipe the backbone's features fill ~3 of their 512 dimensions (RankMe 2.7 over
the monitor's 1078 images, against 81 for the untouched recipe and the random network), and the views' embeddings
agree no better than at the start (measured while choosing the recipe)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.reports.health import DIMENSIONAL, HEALTHY
from tests.support.runs import S3_ENV, run_barlow, train_args

COLLAPSING = ["optim.eta=10", "optim.warmup_epochs=0", "monitor.knn_every_epochs=1"]


def health_of(run: str, page: Path, *options: str) -> tuple[list[dict], str]:
    """The report's health data and its page's text, through `barlow report` as a user types it."""
    result = run_barlow("report", run, "-o", str(page), *options, env=S3_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="health-data">(.*?)</script>', text)[1]), text


def summary(page: str) -> dict[str, str]:
    table = re.search(r'<table id="summary">(.*?)</table>', page)[1]
    return dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table))


def test_a_run_made_to_collapse_is_judged_collapsed_and_the_same_recipe_healthy(tiny_run, tmp_path):
    collapsed = tmp_path / "collapsed"
    trained = run_barlow(*train_args(str(collapsed), *COLLAPSING), threads=2)
    assert trained.returncode == 0, trained.stderr[-3000:]
    health, page = health_of(str(collapsed), tmp_path / "collapsed.html")
    assert [attempt["verdict"] for attempt in health] == [DIMENSIONAL]
    spread, rank = health[0]["signals"][:2]
    assert rank["state"] == DIMENSIONAL and spread["state"] == HEALTHY  # not every input at one point: few directions
    rows = summary(page)
    assert list(rows)[:4] == ["state", "steps", "rate", "verdict"]  # the page opens with them
    assert rows["state"] == "finished" and rows["steps"].startswith("16 of 16 steps done")
    assert rows["verdict"].startswith("dimensional collapse (")
    assert page.index('id="health"') < page.index("<figure")  # the health section comes before the figures

    # the same recipe, untouched (the shared run: 2 workers on S3, the monitor after its epoch)
    health, page = health_of(tiny_run.url, tmp_path / "tiny.html", "--endpoint-url", tiny_run.endpoint)
    assert [attempt["verdict"] for attempt in health] == [HEALTHY]
    assert summary(page)["verdict"].startswith("healthy (")
