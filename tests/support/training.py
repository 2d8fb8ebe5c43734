"""A tiny model, its LARS optimizer and a checkpoint manager, trained a step at a time in this process: for tests
that need real checkpoints without a training run."""

from __future__ import annotations

import torch

from service.checkpoint.manager import CheckpointManager
from service.method.model import BarlowTwins
from service.method.optim import build_lars
from service.run.lease import take_lease
from service.runtime.distributed import Worker
from service.spec import CheckpointSpec, ModelSpec, StorageSpec, TrainSpec

MODEL = ModelSpec(backbone="resnet18", stem="cifar", projector="32-16")
WORKER = Worker(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _HoldingItsLease(CheckpointManager):
    """A manager that gives its lease back when it closes, as a training run does at its end."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.lease is not None:
                self.lease.release()


class Training:
    """A tiny model, its LARS optimizer and a manager, trained a step at a time."""

    def __init__(self, run_url, storage=StorageSpec(), model=MODEL, seed=0, fp16=False, image_size=224, **checkpoint):
        torch.manual_seed(seed)
        self.model = BarlowTwins(model)
        self.optimizer = build_lars(self.model, weight_decay=1e-6, momentum=0.9, eta=0.001)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.1
        self.scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0**10)  # fp16: its state is saved
        spec = TrainSpec.model_validate({"data": {"dataset": "digits", "image_size": image_size},
                                         "model": model.model_dump(),
                                         "run": {"output": run_url}})
        checkpoint_spec = CheckpointSpec(**checkpoint)
        lease = take_lease(run_url, storage, WORKER, None, timeout_s=checkpoint_spec.lease_timeout)
        self.manager = _HoldingItsLease(
            run_url=run_url, spec=checkpoint_spec, storage=storage, worker=WORKER, model=self.model,
            optimizer=self.optimizer, scaler=self.scaler, steps_per_epoch=4,
            resolved_spec=spec.model_dump(mode="json"), lease=lease,
        )

    def step(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        z1, z2, _ = self.model(torch.randn(4, 3, 8, 8, generator=generator),
                               torch.randn(4, 3, 8, 8, generator=generator))
        self.optimizer.zero_grad()
        self.scaler.scale((z1 - z2).square().mean()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state(self) -> dict:
        momentum = {f"mu.{i}": self.optimizer.state[p]["mu"] for i, p in enumerate(self.model.parameters())
                    if p in self.optimizer.state}
        return {**self.model.state_dict(), **momentum}
