"""Pre-emption: SIGTERM (Kubernetes' notice before it kills a pod) asks the run to checkpoint and stop.

Workers may receive the signal a step apart, so they vote after every step and all stop at the same step. The vote
runs on a CPU (gloo) group without blocking: each step starts its vote and reads the previous step's, which
finished long ago, so the vote never waits for the device or for a slower peer; the run stops one step later.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

from service.runtime.distributed import new_cpu_group

log = logging.getLogger("barlow")


class Preemption:
    def __init__(self):
        self.requested = False
        self.group = new_cpu_group()
        self.pending = None  # the vote in flight: (work, tensor)
        self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # asked twice (e.g. torchrun stopping a failed group): stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        log.warning("SIGTERM received: checkpointing after this step, then stopping")
        self.requested = True

    def agreed(self) -> bool:
        """True on every worker, at the same step, one step after any worker was asked to stop."""
        if self.group is None:
            return self.requested
        stop = self._previous_vote()
        vote = torch.tensor([int(self.requested)])
        self.pending = (dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True), vote)
        return stop

    def _previous_vote(self) -> bool:
        if self.pending is None:
            return False
        work, vote = self.pending
        work.wait()
        self.pending = None
        return bool(vote.item())

    def close(self) -> None:
        try:
            self._previous_vote()  # every live worker started it, so it completes
        except RuntimeError:  # a peer is gone: the run is ending anyway, and its own error is the one to report
            pass
        signal.signal(signal.SIGTERM, self.previous)
