"""TensorBoard event files under `run.output/tensorboard/`, on a local folder or an object store.

torch.utils.tensorboard writes to a local folder. An object store cannot append, and a writer pointed straight at
s3:// uploads its whole file again at every flush (tensorboard#5655), so for a remote output the events are
written to a local folder and each file is uploaded once, closed: the writer is rotated (closed, uploaded, a new
one opened at the next event) at every `sync()`, which the run calls every few minutes and at each checkpoint.

A resumed run trains again the steps after its checkpoint: its first writer starts with `purge_step` at the
resumed step, a marker that makes TensorBoard (and its EventAccumulator) drop the earlier events at steps from
there on.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.run.layout import TENSORBOARD
from service.spec import StorageSpec
from service.storage.filesystem import explain, filesystem, is_remote

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("barlow")

FOLDER = TENSORBOARD  # under run.output
EVENT_FILES = "events.out.tfevents.*"
# the diverging map of the cross-correlation image: -1 blue, 0 white, +1 red (coolwarm's ends), linear between
NEGATIVE, ZERO, POSITIVE = (59, 76, 192), (255, 255, 255), (180, 4, 38)


def correlation_colors(matrix: np.ndarray) -> np.ndarray:
    """An H x W x 3 uint8 image of a matrix with values in [-1, 1] (clipped)."""
    value = np.clip(np.asarray(matrix, dtype=np.float64), -1.0, 1.0)[..., None]
    zero, negative, positive = (np.array(color, dtype=np.float64) for color in (ZERO, NEGATIVE, POSITIVE))
    rgb = np.where(value < 0, zero + (zero - negative) * value, zero + (positive - zero) * value)
    return np.rint(rgb).astype(np.uint8)


class EventFiles:
    """The run's TensorBoard writer: scalars and images by step, uploaded as closed files to a remote output."""

    def __init__(self, output: str, storage: StorageSpec, *, purge_step: int | None):
        self.url = f"{output.rstrip('/')}/{FOLDER}"
        self.remote = is_remote(output)
        self.fs, self.remote_path = filesystem(self.url, storage)
        self.folder = Path(tempfile.mkdtemp(prefix="barlow-tensorboard-")) if self.remote else Path(self.remote_path)
        self.purge_step = purge_step  # given to the first writer only: later ones continue the same attempt
        self.writer: SummaryWriter | None = None
        self.open_file: Path | None = None
        self.opened = 0

    def _writer(self) -> SummaryWriter:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes events

            before = set(self.folder.glob(EVENT_FILES))
            # flushed to the local file every minute (a local output is read live), uploaded at each sync()
            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step, flush_secs=60)
            self.open_file = next(iter(set(self.folder.glob(EVENT_FILES)) - before), None)
            self.purge_step = None
            self.opened = int(time.time())
        return self.writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        writer = self._writer()
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self._writer().add_image(tag, rgb, step, dataformats="HWC")

    def sync(self, *, final: bool = False) -> None:
        """Make the events so far readable at run.output: flushed locally; remotely, the file closed and uploaded.

        A file opened within the same second is flushed and uploaded open instead (uploaded again once closed):
        event files are ordered by the whole seconds in their names, and a resumed run's purge marker must come
        after the files it purges.
        """
        if not self.remote:
            if self.writer is not None:
                self.writer.flush()
                if final:
                    self.writer.close()
                    self.writer = None
            return
        if self.writer is not None:
            if final or int(time.time()) != self.opened:
                self.writer.close()
                self.writer, self.open_file = None, None
            else:
                self.writer.flush()
        for path in sorted(self.folder.glob(EVENT_FILES)):
            try:
                self.fs.put_file(str(path), f"{self.remote_path}/{path.name}")
            except Exception as error:  # noqa: BLE001 - the file stays here and is uploaded at the next sync
                log.warning("could not upload %s now: %s", path.name, explain(self.url, error))
                continue
            if path != self.open_file:
                path.unlink()  # closed and uploaded: never written again

    def close(self) -> None:
        try:
            self.sync(final=True)
        finally:
            if self.remote and not any(self.folder.iterdir()):
                shutil.rmtree(self.folder, ignore_errors=True)
