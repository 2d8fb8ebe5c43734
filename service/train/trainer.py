"""Pretraining as a spec says: `build` makes every piece of one attempt at the run, in an order that matters, and
`loop` trains over them; `train` does both and exports the backbone.

One process, or one worker per process under torchrun:
    barlow train specs/digits.yaml
    torchrun --standalone --nproc-per-node 2 -m service train specs/digits.yaml
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from service.checkpoint.export import export_backbone, exported_weights_url
from service.checkpoint.manager import CheckpointManager
from service.data.datasets import labelled_images
from service.data.loader import GlobalBatchSampler, LoaderSettings, SkippedSamples, checked, two_view_loader
from service.errors import NonFiniteLoss
from service.evaluation.knn_monitor import KnnMonitor
from service.method.color import DeviceColor
from service.method.model import BarlowTwins
from service.method.optim import LearningRateSchedule, lars_for
from service.method.transforms import geometric_pipeline, two_view_pipelines
from service.observe.logs import set_step
from service.observe.stats import TrainingStats
from service.observe.step_metrics import StepClock
from service.observe.tensorboard import EventFiles
from service.run.layout import checkpoint_url, write_spec
from service.run.lease import Lease, own_output
from service.runtime import distributed
from service.runtime.distributed import shard
from service.runtime.guard import NonFiniteGuard
from service.runtime.precision import Precision
from service.runtime.preemption import Preemption
from service.spec import TrainSpec
from service.train.placement import place_model
from service.train.step import StepOutput, read_logged_step, training_step

log = logging.getLogger("barlow")


@dataclass
class TrainResult:
    output: str
    weights: str
    steps: int
    last_loss: float | None
    preempted: bool
    failed_checkpoints: list[int]
    last_checkpoint_committed: bool


@dataclass
class Batches:
    """This worker's two-view batches, and what a batch goes through on its way into the step."""

    loader: DataLoader
    sampler: GlobalBatchSampler
    loading: LoaderSettings
    steps_per_epoch: int
    skipped: SkippedSamples | None  # under data.on_error=skip: the substitutes counted against data.max_errors
    device_color: DeviceColor | None  # the colour half of the augmentations, when it runs on the device
    rows: tuple[int, int]  # this worker's rows of the global batch: the device colour's per-row seeds
    channels_last: bool

    def prepare(self, y1: torch.Tensor, y2: torch.Tensor, replaced: torch.Tensor, device: torch.device,
                epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the batch's substitutes; the views on the device, coloured there when asked, in the model's format."""
        if self.skipped is not None:
            self.skipped.add(replaced)
        y1 = y1.to(device, non_blocking=True)
        y2 = y2.to(device, non_blocking=True)
        if self.device_color is not None:
            y1, y2 = self.device_color((y1, y2), epoch, step % self.steps_per_epoch, self.rows)
        if self.channels_last:
            y1 = y1.contiguous(memory_format=torch.channels_last)
            y2 = y2.contiguous(memory_format=torch.channels_last)
        return y1, y2


@dataclass
class Training:
    """One attempt at a run: its pieces, made by `build`, and where the loop is (`step`: completed steps)."""

    spec: TrainSpec
    worker: distributed.Worker
    batches: Batches
    model: BarlowTwins
    trained: nn.Module  # what the step calls: the model, DDP-wrapped under several workers, compiled when asked
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    precision: Precision
    scaler: torch.amp.GradScaler
    monitor: KnnMonitor
    lease: Lease | None  # None on the ranks other than 0
    checkpointer: CheckpointManager
    stats: TrainingStats
    guard: NonFiniteGuard
    preemption: Preemption
    step: int
    next_image: int | None  # the step from which the next logged step draws the cross-correlation
    last_loss: float | None = None
    preempted: bool = False

    def stop_if_diverged(self) -> None:
        """Raise NonFiniteLoss when the guard skipped a non-finite step: nothing non-finite is ever saved."""
        bad = self.guard.first_bad_step()
        if bad is None:
            return
        self.stats.event("diverged", step=bad, epoch=bad // self.batches.steps_per_epoch)
        raise NonFiniteLoss(
            f"the loss or the gradients became non-finite at step {bad} (epoch {bad // self.batches.steps_per_epoch}), "
            f"and that step was not applied; nothing non-finite was saved. Newest finite checkpoint: "
            f"{self.checkpointer.newest_committed_url() or 'none'}. Lower optim.lr_weights / optim.lr_biases (or use "
            "run.precision=bf16 or fp32) and resume from it, naming what you change in checkpoint.allow_changes "
            "(e.g. --set optim.lr_weights=0.1 --set 'checkpoint.allow_changes=[optim.lr_weights]')"
        )

    def save(self, wait: bool = False) -> None:
        """Checkpoint the state after `step` steps, unless the run diverged."""
        self.stop_if_diverged()
        self.checkpointer.save(self.step, wait=wait)
        self.stats.event("checkpoint", step=self.step, epoch=self.step // self.batches.steps_per_epoch,
                         url=checkpoint_url(self.spec.run.output, self.step))

    def close(self) -> None:
        """Await the last save; the lease given back and the stats closed even when that save failed."""
        self.preemption.close()
        try:
            self.checkpointer.close()
        finally:
            if self.lease is not None:
                self.lease.release()
            self.stats.close()


def train(spec: TrainSpec, command: str, force: bool = False) -> TrainResult:
    """Pretrain as the spec says. `force` takes run.output's lease from a run that still holds it."""
    worker = distributed.start(spec.run.device)
    try:
        return _train(spec, command, worker, force)
    finally:
        distributed.stop()


def _train(spec: TrainSpec, command: str, worker: distributed.Worker, force: bool) -> TrainResult:
    """Build, loop, then export the backbone (tests/support/raising_worker.py replaces this function by name)."""
    run = build(spec, command, worker, force)
    try:
        loop(run)
    finally:
        run.close()
    committed = run.checkpointer.last_save_committed
    if worker.is_main and not run.preempted and committed:  # never export weights no checkpoint holds
        export_backbone(run.model, spec)
    distributed.barrier()
    return TrainResult(output=spec.run.output, weights=exported_weights_url(spec), steps=run.step,
                       last_loss=run.last_loss, preempted=run.preempted, failed_checkpoints=run.checkpointer.failed,
                       last_checkpoint_committed=committed)


# ---------------------------------------------------------------------------------------------------------------
# build: every rank makes the same pieces in the same order (the seed first; the collectives of the lease, the
# restore and the pre-emption vote in step across ranks)


def build(spec: TrainSpec, command: str, worker: distributed.Worker, force: bool) -> Training:
    """Every piece of one attempt at the run, its checkpoint restored, spec.yaml written and the start recorded.

    Nothing is written under run.output before it is checked writable and its lease is ours; the restore checks
    the recipe against the checkpoint before spec.yaml and stats.txt are written."""
    torch.manual_seed(spec.run.seed)
    batches = _batches(spec, worker)
    model, trained = place_model(BarlowTwins(spec.model), worker, batches.channels_last, spec.ddp)
    assert isinstance(model, BarlowTwins)  # place_model converts its BatchNorm layers in place
    if spec.run.compile:  # the DDP module compiled whole: Dynamo splits its graph at the gradient buckets
        trained = torch.compile(trained)  # type: ignore[assignment]  # a Module's is a Module; torch types a callable
    optimizer = lars_for(model, spec.optim)
    schedule = LearningRateSchedule(
        steps_per_epoch=batches.steps_per_epoch, epochs=spec.optim.epochs, warmup_epochs=spec.optim.warmup_epochs,
        batch_size=spec.optim.batch_size, lr_weights=spec.optim.lr_weights, lr_biases=spec.optim.lr_biases,
    )
    precision = Precision.choose(spec.run.precision, worker.device)
    scaler = precision.grad_scaler()
    monitor = KnnMonitor(spec, worker, batches.loading.workers)
    lease, group = own_output(spec.run.output, spec.storage, worker, timeout_s=spec.checkpoint.lease_timeout,
                              force=force)
    checkpointer = CheckpointManager(
        run_url=spec.run.output, spec=spec.checkpoint, storage=spec.storage, worker=worker, model=model,
        optimizer=optimizer, scaler=scaler, steps_per_epoch=batches.steps_per_epoch,
        resolved_spec=spec.model_dump(mode="json"), lease=lease, group=group,
    )
    total_steps = spec.optim.epochs * batches.steps_per_epoch
    step, stats = _restore(spec, command, worker, checkpointer, lease, total_steps)
    _record_start(spec, worker, checkpointer, stats, step, batches, total_steps)
    guard = NonFiniteGuard(worker.device, first_step=step)
    preemption = Preemption()
    log.info("training %s on %d worker(s), %s, %d steps per epoch, global batch %d; %d loading process(es), "
             "prefetch %s", spec.model.backbone, worker.world_size, worker.device, batches.steps_per_epoch,
             spec.optim.batch_size, batches.loading.workers, batches.loading.prefetch)
    image_every = spec.run.image_every or 0
    next_image = -(-step // image_every) * image_every if image_every else None  # the first multiple from here
    return Training(spec=spec, worker=worker, batches=batches, model=model, trained=trained, optimizer=optimizer,
                    schedule=schedule, precision=precision, scaler=scaler, monitor=monitor, lease=lease,
                    checkpointer=checkpointer, stats=stats, guard=guard, preemption=preemption, step=step,
                    next_image=next_image)


def _batches(spec: TrainSpec, worker: distributed.Worker) -> Batches:
    images = labelled_images(spec.data, train=True, storage=spec.storage)
    color_on_device = spec.augment.color_on == "device" or (
        spec.augment.color_on == "auto" and worker.device.type == "cuda")
    share = shard(spec.optim.batch_size, worker.rank, worker.world_size)  # as GlobalBatchSampler's slice
    device_color = None
    if color_on_device:
        geometric = geometric_pipeline(spec.augment, spec.data.image_size)
        views = (geometric, geometric)
        device_color = DeviceColor(spec.augment, spec.data.image_size, spec.run.seed, spec.optim.batch_size)
    else:
        views = two_view_pipelines(spec.augment, spec.data.image_size)
    # uint8 views when the colour half runs on the device: a quarter of the bytes through /dev/shm and the bus
    view_bytes = 3 * spec.data.image_size ** 2 * (1 if color_on_device else 4)
    loading = LoaderSettings.choose(
        spec.data, batch_bytes=2 * view_bytes * len(share),
        local_workers=distributed.local_world_size(), cuda=worker.device.type == "cuda")
    loader, sampler = two_view_loader(
        images, views, global_batch=spec.optim.batch_size, rank=worker.rank, world_size=worker.world_size,
        seed=spec.run.seed, settings=loading, on_error=spec.data.on_error,
    )
    skipped = SkippedSamples(images, spec.data.max_errors) if spec.data.on_error == "skip" else None
    return Batches(loader=loader, sampler=sampler, loading=loading, steps_per_epoch=len(loader), skipped=skipped,
                   device_color=device_color, rows=(share.start, share.stop),
                   channels_last=spec.run.channels_last and worker.device.type == "cuda")


def _restore(spec: TrainSpec, command: str, worker: distributed.Worker, checkpointer: CheckpointManager,
             lease: Lease | None, total_steps: int) -> tuple[int, TrainingStats]:
    """The step to start from (the checkpoint restored), then spec.yaml written and the stats opened at it."""
    try:
        step = checkpointer.restore()
        # after the restore: a resume it refuses (a recipe changed without allow_changes) keeps the run's spec.yaml
        if worker.is_main:
            write_spec(spec.run.output, spec.storage, spec)
        events = EventFiles(spec.run.output, spec.storage, purge_step=step) if (
            spec.run.tensorboard and worker.is_main) else None
        stats = TrainingStats(spec.run.output, spec.storage, command, total_steps=total_steps, enabled=worker.is_main,
                              events=events, sync_every_seconds=spec.run.sync_every_seconds)
    except BaseException:
        checkpointer.close()
        if lease is not None:  # given back now: a corrected rerun need not wait for it to go stale
            lease.release()
        raise
    return step, stats


def _record_start(spec: TrainSpec, worker: distributed.Worker, checkpointer: CheckpointManager,
                  stats: TrainingStats, step: int, batches: Batches, total_steps: int) -> None:
    """The "start" event (with the data set's name and size, for the exported model's card), and the recipe
    changes this resume was allowed."""
    stats.advance(step)
    steps_per_epoch = batches.steps_per_epoch
    resumed_from = (checkpointer.parent or {}).get("checkpoint") or checkpointer.newest_committed_url()
    stats.event("start", step=step, epoch=step // steps_per_epoch, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, world_size=worker.world_size, global_batch=spec.optim.batch_size,
                dataset=spec.data.dataset, train_images=batches.sampler.dataset_size,
                resumed_from=resumed_from if step else None, wall=time.time())
    if checkpointer.resumed_changes:
        stats.record(epoch=step // steps_per_epoch, step=step, resumed_with_changes=checkpointer.resumed_changes)


# ---------------------------------------------------------------------------------------------------------------
# loop


def loop(run: Training) -> None:
    """Train from `run.step` to the last epoch's end, or to the step at which every worker agreed to stop
    (SIGTERM); checkpoint there. The caller closes the run."""
    spec, batches = run.spec, run.batches
    clock = StepClock()
    first_epoch, first_batch = divmod(run.step, batches.steps_per_epoch)
    for epoch in range(first_epoch, spec.optim.epochs):
        batches.sampler.set_epoch(epoch, start_batch=first_batch if epoch == first_epoch else 0)
        for y1, y2, replaced in clock.timed(checked(batches.loader)):
            _step(run, clock, epoch, y1, y2, replaced)
            if run.preemption.agreed():
                run.save(wait=True)
                run.stats.event("preempted", step=run.step, epoch=run.step // batches.steps_per_epoch)
                run.preempted = True
                return
            if run.checkpointer.due(run.step):
                run.save()
                run.stats.sync()
        if run.monitor.due(epoch):
            run.monitor.run(run.model.backbone, epoch, run.step, run.stats)
            clock.restart()  # evaluation is not training: the next line's step time leaves it out
    if run.checkpointer.last_saved_step != run.step:
        run.save(wait=True)
    run.stats.event("end", step=run.step, epoch=run.step // batches.steps_per_epoch)


def _step(run: Training, clock: StepClock, epoch: int, y1: torch.Tensor, y2: torch.Tensor,
          replaced: torch.Tensor) -> None:
    """One step of the loop: the batch onto the device, the learning rates, the step, and its line when logged."""
    spec = run.spec
    set_step(run.step)
    y1, y2 = run.batches.prepare(y1, y2, replaced, run.worker.device, epoch, run.step)
    lr_weights, lr_biases = run.schedule.apply(run.optimizer, run.step)
    logged = run.step % spec.run.log_every == 0
    output = training_step(run.trained, run.optimizer, run.scaler, run.precision, spec.loss, y1, y2,
                           spec.optim.batch_size, run.guard, observe=logged,
                           rank=logged and spec.monitor.knn_every_epochs is None)  # else the monitor gives RankMe
    clock.step_done()
    if logged:
        _log_step(run, clock, epoch, output, lr_weights, lr_biases)
    run.stats.advance()
    run.step += 1


def _log_step(run: Training, clock: StepClock, epoch: int, output: StepOutput, lr_weights: float,
              lr_biases: float) -> None:
    """A logged step's line (the one wait for the device), and the cross-correlation image when one is due."""
    run.stop_if_diverged()
    measured = read_logged_step(output, clock, run.worker, run.spec.optim.batch_size)
    run.last_loss = measured.pop("loss")
    if run.batches.skipped is not None:
        measured["skipped"] = run.batches.skipped.count()
    run.stats.log(epoch=epoch, step=run.step, lr_weights=lr_weights, lr_biases=lr_biases, loss=run.last_loss,
                  **measured)
    image_every = run.spec.run.image_every or 0
    if run.next_image is not None and run.step >= run.next_image:
        assert output.correlation is not None  # observed steps carry it
        run.stats.correlation(run.step, output.correlation.cpu().numpy())
        run.next_image = (run.step // image_every + 1) * image_every
