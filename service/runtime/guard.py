"""The non-finite step guard: a step whose loss or gradients are not finite is never applied."""

from __future__ import annotations

import torch

from service.runtime import multi_tensor


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
