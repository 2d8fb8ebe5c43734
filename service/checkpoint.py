"""A simple local per-epoch checkpoint, resumed automatically (the reference's behaviour).

Unlike the reference it also keeps the GradScaler and the resolved spec, and never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from service.distributed import Worker


class EpochCheckpoint:
    def __init__(self, output: Path, worker: Worker):
        self.path = output / "checkpoint.pth"
        self.worker = worker

    def save(self, *, epoch: int, model, optimizer, scaler, spec: dict) -> None:
        """Called by every worker; the main worker writes `{epoch, model, optimizer, scaler, spec}` atomically."""
        if not self.worker.is_main:
            return
        state = dict(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict(), spec=spec)
        partial = self.path.with_suffix(".pth.partial")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def load(self, *, model, optimizer, scaler) -> int:
        """Restore the last epoch's state if there is one; returns the epoch to start from."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])
