"""Numerical precision of a run: autocast and loss scaling for `run.precision` on the chosen device."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("barlow")


@dataclass(frozen=True)
class Precision:
    """Autocast and loss scaling for the spec's precision on the chosen device."""

    dtype: torch.dtype | None
    device_type: str

    @classmethod
    def choose(cls, precision: str, device: torch.device) -> Precision:
        if precision == "fp32":
            return cls(None, device.type)
        if device.type == "cuda":
            return cls(torch.float16 if precision == "fp16" else torch.bfloat16, "cuda")
        if precision == "bf16":
            return cls(torch.bfloat16, device.type)
        log.warning("run.precision=fp16 needs CUDA; training in fp32 on %s", device.type)
        return cls(None, device.type)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)
