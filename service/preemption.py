"""Pre-emption: SIGTERM (Kubernetes' notice before it kills a pod) asks the run to checkpoint and stop.

Workers may receive the signal a step apart, so they vote after every step and all stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

from service.distributed import new_cpu_group

log = logging.getLogger("barlow")


class Preemption:
    def __init__(self):
        self.requested = False
        self.group = new_cpu_group()
        self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # asked twice (e.g. torchrun stopping a failed group): stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        log.warning("SIGTERM received: checkpointing after this step, then stopping")
        self.requested = True

    def agreed(self) -> bool:
        """True on every worker once any worker has been asked to stop."""
        if self.group is None:
            return self.requested
        vote = torch.tensor([int(self.requested)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        return bool(vote.item())

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)
