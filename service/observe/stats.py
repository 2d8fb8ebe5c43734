"""A run's statistics: the reference's stats.txt, TensorBoard's event files, and a progress display.

stats.txt keeps the reference's format (the command line, then one JSON object per line) and its fields first;
`service.reports.run_log` reads it back. Only the main worker writes; a remote `run.output` gets both stats.txt
and the closed event files every `run.sync_every_seconds`, at each checkpoint and at the end.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.observe.tensorboard import EventFiles, correlation_colors
from service.run.layout import STATS, under
from service.spec import StorageSpec
from service.storage.filesystem import explain, filesystem, is_remote

log = logging.getLogger("barlow")

# stats.txt's fields and their TensorBoard tags; fields not listed stay in stats.txt only
TAGS = {
    "loss": "loss/total", "loss_on_diag": "loss/on_diag", "loss_off_diag": "loss/off_diag",
    "lr_weights": "lr/weights", "lr_biases": "lr/biases",
    "images_per_s": "throughput/images_per_s", "images_per_s_per_worker": "throughput/images_per_s_per_worker",
    "data_wait": "throughput/data_wait", "step_time": "throughput/step_time",
    "peak_memory_gib": "memory/peak_gib", "embedding_std": "collapse/embedding_std",
    "correlation_diagonal": "collapse/correlation_diagonal",
    "correlation_off_diagonal": "collapse/correlation_off_diagonal",
    "knn_top1": "knn/top1", "rankme": "collapse/rankme",
}
CORRELATION_TAG = "cross_correlation"


class TrainingStats:
    """Writes stats.txt like the reference, with TensorBoard beside it: the command line, then JSON lines.

    A logged step is {"epoch", "step", "lr_weights", "lr_biases", "loss", "time"} (`time` in whole seconds since
    this attempt started), then the step's measurements; `record` writes other lines (evaluation, the kNN
    monitor) and `event` the run's events ({"event": "start" | "checkpoint" | "preempted" | "end" | ...}).
    """

    def __init__(self, output: str, storage: StorageSpec, command: str, *, total_steps: int, enabled: bool,
                 events: EventFiles | None = None, sync_every_seconds: float = 300):
        self.enabled = enabled
        self.start = time.time()
        self.total_steps = total_steps
        self.events = events if enabled else None
        self.sync_every_seconds = sync_every_seconds
        self.synced = time.monotonic()
        self.progress = None
        self.file = None
        if not enabled:
            return
        # Object stores cannot append: a local copy is appended to and uploaded whole by sync().
        self.fs, self.remote_path = filesystem(under(output, STATS), storage)
        if is_remote(output):
            self.local_path = Path(tempfile.mkdtemp(prefix="barlow-stats-")) / STATS
            if self.fs.exists(self.remote_path):
                self.fs.get_file(self.remote_path, str(self.local_path))
        else:
            self.local_path = Path(self.remote_path)
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.local_path, "a", buffering=1)
        print(command, file=self.file)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def _write(self, line: dict[str, Any]) -> None:
        print(json.dumps(line), file=self.file)
        if self.events is not None:
            tagged = {TAGS[key]: value for key, value in line.items() if key in TAGS and value is not None}
            if tagged and "step" in line:
                self.events.scalars(line["step"], tagged)
        if time.monotonic() - self.synced >= self.sync_every_seconds:
            self.sync()

    def log(self, *, epoch: int, step: int, lr_weights: float, lr_biases: float, loss: float, **measured) -> dict:
        """One logged step: the reference's fields, then the step's measurements (step_metrics) and counters."""
        stats = dict(epoch=epoch, step=step, lr_weights=lr_weights, lr_biases=lr_biases, loss=loss,
                     time=int(time.time() - self.start), **measured)
        if self.enabled:
            self._write(stats)
            if self.progress is not None:
                self.progress.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
            else:
                rate = measured.get("images_per_s")
                log.info("epoch %d step %d/%d loss %.6g lr_weights %.4g lr_biases %.4g%s", epoch, step,
                         self.total_steps, loss, lr_weights, lr_biases,
                         "" if rate is None else f" {rate:.1f} images/s")
        return stats

    def record(self, **fields) -> dict:
        """One JSON line of any other statistics (evaluation accuracies, the kNN monitor), logged as well."""
        stats = {**fields, "time": int(time.time() - self.start)}
        if self.enabled:
            self._write(stats)
            log.info(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in fields.items()))
        return stats

    def event(self, name: str, **fields) -> None:
        """One of the run's events (start, checkpoint, preempted, end, diverged) as a stats.txt line."""
        if self.enabled:
            self._write({"event": name, **fields, "time": int(time.time() - self.start)})

    def correlation(self, step: int, matrix: np.ndarray) -> None:
        """The (decimated) cross-correlation matrix as a TensorBoard image."""
        if self.events is not None:
            self.events.image(step, CORRELATION_TAG, correlation_colors(matrix))

    def sync(self) -> None:
        """Upload stats.txt and the closed event files to a remote output (local ones are flushed)."""
        self.synced = time.monotonic()
        if self.events is not None:
            self.events.sync()
        if self.file is not None and str(self.local_path) != self.remote_path:
            try:
                self.fs.put_file(str(self.local_path), self.remote_path)
            except Exception as error:  # noqa: BLE001 - stats are uploaded again at the next sync
                log.warning("could not upload stats.txt now: %s", explain(self.remote_path, error))

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.file is not None:
            self.file.close()
            self.sync()
