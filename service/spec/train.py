"""The spec of a pretraining run (`barlow train`): every section, defaults the reference's."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, model_validator

from service.spec.job import JobSpec
from service.spec.sections import (
    AugmentSpec,
    CheckpointSpec,
    DataSpec,
    DdpSpec,
    LossSpec,
    ModelSpec,
    MonitorSpec,
    OptimSpec,
    RunSpec,
    StorageSpec,
)


class TrainSpec(JobSpec):
    """A Barlow Twins pretraining run."""

    data: DataSpec = Field(default_factory=DataSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    ddp: DdpSpec = Field(default_factory=DdpSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)

    @model_validator(mode="after")
    def _batch_covers_workers(self, info: ValidationInfo) -> TrainSpec:
        world_size = (info.context or {}).get("world_size")
        if world_size and self.optim.batch_size < world_size:
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} is smaller than the {world_size} workers: every worker "
                f"needs a share of the global batch; raise optim.batch_size to at least {world_size} or use fewer "
                "workers"
            )
        return self
