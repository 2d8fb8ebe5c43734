"""barlow report's page (service/reports/report.py) in process, on the S3 server: the newest cross-correlation image
that a resume kept, and a folder without stats.txt refused. The figures' data are read back from the page's JSON."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import StorageError
from service.observe.stats import CORRELATION_TAG
from service.observe.tensorboard import POSITIVE, ZERO, EventFiles, correlation_colors
from service.reports.report import write_report
from service.spec import StorageSpec
from service.storage.filesystem import filesystem

FIGURES = {"loss", "lr", "knn", "throughput", "memory", "collapse", "timeline", "correlation"}

def figure_data(page: str) -> dict[str, dict]:
    found = re.findall(r'<script type="application/json" class="figure-data" data-figure="([a-z]+)">(.*?)</script>',
                       page, flags=re.DOTALL)
    return {name: json.loads(text.replace("<\\/", "</")) for name, text in found}


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
