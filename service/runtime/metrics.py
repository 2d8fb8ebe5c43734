"""Training statistics: the reference's stats.txt, a progress display, and the non-finite step guard."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from service.method import multi_tensor
from service.spec import StorageSpec
from service.storage.filesystem import explain, filesystem, is_remote

log = logging.getLogger("barlow")


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients stopped being finite: the run stops without saving anything after that step."""


class NonFiniteGuard:
    """Checks every step, on the device and without a host sync, that the loss and the gradients are finite.

    `finite()` runs between the backward pass and the optimizer step; its 0-d result makes the step conditional
    (a non-finite step is not applied), and the first such step is remembered on the device. `first_bad_step()`
    reads it, a host sync, so the loop calls it only where it waits for the device anyway: at logged steps and
    before every save. With a GradScaler (fp16) inf gradients are the scaler's business (it skips those steps and
    lowers the scale); only a non-finite loss counts.
    """

    def __init__(self, device: torch.device, first_step: int):
        self.step = first_step
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def finite(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaled: bool) -> torch.Tensor:
        gradients = [] if scaled else [p.grad for group in optimizer.param_groups for p in group["params"]
                                       if p.grad is not None]
        finite = torch.isfinite(loss) & multi_tensor.all_finite(gradients) if gradients else torch.isfinite(loss)
        self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, self.step)
        self.step += 1
        return finite

    def first_bad_step(self) -> int | None:
        bad = int(self.first_bad.item())  # host sync: callers are at a logged step or a save
        return None if bad < 0 else bad


class TrainingStats:
    """Writes `stats.txt` like the reference: the command line, then one JSON line per logged step.

    Each line is {"epoch", "step", "lr_weights", "lr_biases", "loss", "time"} with `time` in whole seconds since
    the start. Only the main worker writes; the others keep the guard.
    """

    def __init__(self, output: str, storage: StorageSpec, command: str, *, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.start = time.time()
        self.total_steps = total_steps
        self.progress = None
        self.file = None
        if not enabled:
            return
        # Object stores cannot append: a local copy is appended to and uploaded whole by sync().
        self.fs, self.remote_path = filesystem(f"{output.rstrip('/')}/stats.txt", storage)
        if is_remote(output):
            self.local_path = Path(tempfile.mkdtemp(prefix="barlow-stats-")) / "stats.txt"
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

    def log(self, *, epoch: int, step: int, lr_weights: float, lr_biases: float, loss: float, **extra) -> dict:
        """One logged step: the reference's fields, then `extra` ones (data.on_error=skip's `skipped`)."""
        stats = dict(epoch=epoch, step=step, lr_weights=lr_weights, lr_biases=lr_biases, loss=loss,
                     time=int(time.time() - self.start), **extra)
        if self.enabled:
            print(json.dumps(stats), file=self.file)
            if self.progress is not None:
                self.progress.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
            else:
                log.info("epoch %d step %d/%d loss %.6g lr_weights %.4g lr_biases %.4g", epoch, step,
                         self.total_steps, loss, lr_weights, lr_biases)
        return stats

    def record(self, **fields) -> dict:
        """One JSON line of any other statistics (evaluation accuracies, the kNN monitor), logged as well."""
        stats = {**fields, "time": int(time.time() - self.start)}
        if self.enabled:
            print(json.dumps(stats), file=self.file)
            log.info(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in fields.items()))
        return stats

    def sync(self) -> None:
        """Upload the stats to a remote output (a no-op for local folders)."""
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
        if self.file is not None:
            self.file.close()
            self.sync()
