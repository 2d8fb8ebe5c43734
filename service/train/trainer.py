"""Builds the pieces of a pretraining run in a fixed order and runs the loop.

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
from torch.nn.parallel import DistributedDataParallel

from service.checkpoint.export import export_backbone, exported_weights_url
from service.checkpoint.manager import CheckpointManager
from service.data.datasets import labelled_images
from service.data.loader import LoaderSettings, SkippedSamples, checked, two_view_loader
from service.errors import NonFiniteLoss
from service.evaluation.knn_monitor import KnnMonitor
from service.method.batchnorm import convert_sync_batchnorm
from service.method.color import DeviceColor
from service.method.loss import barlow_twins_terms
from service.method.model import BarlowTwins
from service.method.optim import LearningRateSchedule, lars_for
from service.method.transforms import geometric_pipeline, two_view_pipelines
from service.observe.logs import set_step
from service.observe.stats import TrainingStats
from service.observe.step_metrics import StepClock, decimated, embedding_std, peak_memory_gib
from service.observe.tensorboard import EventFiles
from service.run.layout import checkpoint_url, checkpoints_url
from service.run.lease import take_lease
from service.runtime import distributed
from service.runtime.distributed import shard
from service.runtime.guard import NonFiniteGuard
from service.runtime.precision import Precision
from service.runtime.preemption import Preemption
from service.spec import DdpSpec, LossSpec, TrainSpec
from service.storage.filesystem import check_writable

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


def place_model(model: nn.Module, worker: distributed.Worker, channels_last: bool,
                ddp: DdpSpec | None = None) -> tuple[nn.Module, nn.Module]:
    """Move the model to the worker's device; returns (model, the module to train: DDP-wrapped when distributed)."""
    if worker.world_size > 1:
        model = convert_sync_batchnorm(model, worker.device)
    model.to(worker.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if worker.world_size == 1:
        return model, model
    device_ids = [worker.device.index] if worker.device.type == "cuda" else None
    ddp = ddp or DdpSpec()
    # Gradients live in DDP's communication buckets: no copy in and out of them, and one gradient-sized buffer
    # less (about 0.7 GB for the ImageNet recipe).
    trained = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                      static_graph=ddp.static_graph)
    distributed.compress_gradients(trained, ddp.gradient_compression)
    return model, trained


@dataclass
class StepOutput:
    """What one step leaves on the device (0-d tensors, detached): the loss, its two terms scaled as the loss is
    (they add up to it), and, for an observed step, the collapse signal and the decimated cross-correlation."""

    loss: torch.Tensor
    on_diag: torch.Tensor
    off_diag: torch.Tensor
    embedding_std: torch.Tensor | None = None
    correlation: torch.Tensor | None = None


def training_step(model, optimizer, scaler, precision: Precision, loss_spec: LossSpec,
                  y1: torch.Tensor, y2: torch.Tensor, global_batch: int | None = None,
                  guard: NonFiniteGuard | None = None, observe: bool = False) -> StepOutput:
    """One optimisation step on this worker's share of the global batch; returns the (global) loss and its terms.

    `global_batch`, when known, spares the loss exchanging row counts and waiting for the device. With a `guard`,
    a step whose loss or gradients are not finite is not applied (decided on the device). `observe` adds the
    collapse signal of this worker's embeddings and the decimated cross-correlation (device work, no sync).
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        z1, z2 = model(y1, y2)
    terms = barlow_twins_terms(z1, z2, loss_spec.communication, global_batch=global_batch)
    on_diag = terms.on_diag * loss_spec.scale_loss
    off_diag = terms.off_diag * (loss_spec.lambd * loss_spec.scale_loss)
    loss = on_diag + off_diag
    # The logged loss is the reference's; only the gradient is divided, as the reference's was, when asked.
    scaler.scale(loss / (loss_spec.reference_world_size or 1)).backward()
    if guard is None:
        scaler.step(optimizer)
    else:
        scaler.step(optimizer, apply=guard.finite(loss.detach(), optimizer, scaled=scaler.is_enabled()))
    scaler.update()
    output = StepOutput(loss.detach(), on_diag.detach(), off_diag.detach())
    if observe:
        output.embedding_std = embedding_std(z1)
        output.correlation = decimated(terms.correlation)
    return output


def read_logged_step(output: StepOutput, clock: StepClock, worker: distributed.Worker,
                      global_batch: int) -> dict[str, float]:
    """A logged step's measurements, read with one transfer from the device (which the loss's read waits for
    anyway), then the host's clock."""
    assert output.embedding_std is not None  # a logged step is observed
    loss, on_diag, off_diag, spread = torch.stack(
        [value.float() for value in (output.loss, output.on_diag, output.off_diag, output.embedding_std)]).tolist()
    step_time, data_wait = clock.read()
    images_per_s = global_batch / step_time
    return dict(loss=loss, loss_on_diag=on_diag, loss_off_diag=off_diag, step_time=step_time,
                images_per_s=images_per_s, images_per_s_per_worker=images_per_s / worker.world_size,
                data_wait=data_wait, peak_memory_gib=peak_memory_gib(worker.device), embedding_std=spread)


def train(spec: TrainSpec, command: str, force: bool = False) -> TrainResult:
    """Pretrain as the spec says. `force` takes run.output's lease from a run that still holds it."""
    worker = distributed.start(spec.run.device)
    try:
        return _train(spec, command, worker, force)
    finally:
        distributed.stop()


def _train(spec: TrainSpec, command: str, worker: distributed.Worker, force: bool) -> TrainResult:
    torch.manual_seed(spec.run.seed)
    images = labelled_images(spec.data, train=True, storage=spec.storage)
    color_on_device = spec.augment.color_on == "device" or (
        spec.augment.color_on == "auto" and worker.device.type == "cuda")
    share = shard(spec.optim.batch_size, worker.rank, worker.world_size)  # as GlobalBatchSampler's slice
    if color_on_device:
        geometric = geometric_pipeline(spec.augment, spec.data.image_size)
        views = (geometric, geometric)
        device_color = DeviceColor(spec.augment, spec.data.image_size, spec.run.seed, spec.optim.batch_size)
        rows = (share.start, share.stop)
    else:
        views = two_view_pipelines(spec.augment, spec.data.image_size)
        device_color = None
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
    steps_per_epoch = len(loader)
    total_steps = spec.optim.epochs * steps_per_epoch

    channels_last = spec.run.channels_last and worker.device.type == "cuda"
    model, trained = place_model(BarlowTwins(spec.model), worker, channels_last, spec.ddp)
    assert isinstance(model, BarlowTwins)  # place_model converts its BatchNorm layers in place
    if spec.run.compile:  # the DDP module compiled whole: Dynamo splits its graph at the gradient buckets
        trained = torch.compile(trained)  # type: ignore[assignment]  # a Module's is a Module; torch types a callable
    optimizer = lars_for(model, spec.optim)
    schedule = LearningRateSchedule(
        steps_per_epoch=steps_per_epoch, epochs=spec.optim.epochs, warmup_epochs=spec.optim.warmup_epochs,
        batch_size=spec.optim.batch_size, lr_weights=spec.optim.lr_weights, lr_biases=spec.optim.lr_biases,
    )
    precision = Precision.choose(spec.run.precision, worker.device)
    scaler = precision.grad_scaler()

    monitor = KnnMonitor(spec, worker, loading.workers)
    # the run's output must be writable, and ours, before anything is written there
    check_writable(checkpoints_url(spec.run.output), spec.storage)
    group = distributed.new_cpu_group()  # the checkpoints' and the lease's collectives, off the step's
    lease = take_lease(spec.run.output, spec.storage, worker, group, timeout_s=spec.checkpoint.lease_timeout,
                       force=force)
    checkpointer = CheckpointManager(
        run_url=spec.run.output, spec=spec.checkpoint, storage=spec.storage, worker=worker, model=model,
        optimizer=optimizer, scaler=scaler, steps_per_epoch=steps_per_epoch, resolved_spec=spec.model_dump(mode="json"),
        lease=lease, group=group,
    )
    try:
        step = checkpointer.restore()
        events = EventFiles(spec.run.output, spec.storage, purge_step=step) if (
            spec.run.tensorboard and worker.is_main) else None
        stats = TrainingStats(spec.run.output, spec.storage, command, total_steps=total_steps, enabled=worker.is_main,
                              events=events, sync_every_seconds=spec.run.sync_every_seconds)
    except BaseException:
        checkpointer.close()
        if lease is not None:  # given back now: a corrected rerun need not wait for it to go stale
            lease.release()
        raise
    stats.advance(step)
    resumed_from = (checkpointer.parent or {}).get("checkpoint") or checkpointer.newest_committed_url()
    stats.event("start", step=step, epoch=step // steps_per_epoch, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, world_size=worker.world_size, global_batch=spec.optim.batch_size,
                resumed_from=resumed_from if step else None, wall=time.time())
    if checkpointer.resumed_changes:
        stats.record(epoch=step // steps_per_epoch, step=step, resumed_with_changes=checkpointer.resumed_changes)
    guard = NonFiniteGuard(worker.device, first_step=step)

    def stop_if_diverged() -> None:
        bad = guard.first_bad_step()
        if bad is not None:
            stats.event("diverged", step=bad, epoch=bad // steps_per_epoch)
            raise NonFiniteLoss(
                f"the loss or the gradients became non-finite at step {bad} (epoch {bad // steps_per_epoch}), and "
                f"that step was not applied; nothing non-finite was saved. Newest finite checkpoint: "
                f"{checkpointer.newest_committed_url() or 'none'}. Lower optim.lr_weights / optim.lr_biases (or use "
                "run.precision=bf16 or fp32) and resume from it, naming what you change in checkpoint.allow_changes "
                "(e.g. --set optim.lr_weights=0.1 --set 'checkpoint.allow_changes=[optim.lr_weights]')"
            )

    def save(step: int, wait: bool = False) -> None:
        stop_if_diverged()
        checkpointer.save(step, wait=wait)
        stats.event("checkpoint", step=step, epoch=step // steps_per_epoch,
                    url=checkpoint_url(spec.run.output, step))

    preemption = Preemption()
    log.info("training %s on %d worker(s), %s, %d steps per epoch, global batch %d; %d loading process(es), "
             "prefetch %s", spec.model.backbone, worker.world_size, worker.device, steps_per_epoch,
             spec.optim.batch_size, loading.workers, loading.prefetch)

    last_loss = None
    preempted = False
    image_every = spec.run.image_every or 0
    next_image = -(-step // image_every) * image_every if image_every else None  # the first multiple from here
    clock = StepClock()
    try:
        first_epoch, first_batch = divmod(step, steps_per_epoch)
        for epoch in range(first_epoch, spec.optim.epochs):
            sampler.set_epoch(epoch, start_batch=first_batch if epoch == first_epoch else 0)
            for y1, y2, replaced in clock.timed(checked(loader)):
                set_step(step)
                if skipped is not None:
                    skipped.add(replaced)
                y1 = y1.to(worker.device, non_blocking=True)
                y2 = y2.to(worker.device, non_blocking=True)
                if device_color is not None:
                    y1, y2 = device_color((y1, y2), epoch, step % steps_per_epoch, rows)
                if channels_last:
                    y1 = y1.contiguous(memory_format=torch.channels_last)
                    y2 = y2.contiguous(memory_format=torch.channels_last)
                lr_weights, lr_biases = schedule.apply(optimizer, step)
                logged = step % spec.run.log_every == 0
                output = training_step(trained, optimizer, scaler, precision, spec.loss, y1, y2,
                                       spec.optim.batch_size, guard, observe=logged)
                clock.step_done()
                if logged:
                    stop_if_diverged()
                    measured = read_logged_step(output, clock, worker, spec.optim.batch_size)
                    last_loss = measured.pop("loss")
                    if skipped is not None:
                        measured["skipped"] = skipped.count()
                    stats.log(epoch=epoch, step=step, lr_weights=lr_weights, lr_biases=lr_biases, loss=last_loss,
                              **measured)
                    if next_image is not None and step >= next_image:
                        assert output.correlation is not None  # observed steps carry it
                        stats.correlation(step, output.correlation.cpu().numpy())
                        next_image = (step // image_every + 1) * image_every
                stats.advance()
                step += 1
                if preemption.agreed():
                    save(step, wait=True)
                    stats.event("preempted", step=step, epoch=step // steps_per_epoch)
                    preempted = True
                    break
                if checkpointer.due(step):
                    save(step)
                    stats.sync()
            if preempted:
                break
            if monitor.due(epoch):
                monitor.run(model.backbone, epoch, step, stats)
                clock.restart()  # evaluation is not training: the next line's step time leaves it out
        if not preempted and checkpointer.last_saved_step != step:
            save(step, wait=True)
        if not preempted:
            stats.event("end", step=step, epoch=step // steps_per_epoch)
    finally:
        preemption.close()
        try:
            checkpointer.close()
        finally:
            if lease is not None:
                lease.release()
            stats.close()

    last_committed = checkpointer.last_save_committed
    if worker.is_main and not preempted and last_committed:  # never export weights no checkpoint holds
        export_backbone(model, spec)
    distributed.barrier()
    return TrainResult(output=spec.run.output, weights=exported_weights_url(spec), steps=step, last_loss=last_loss,
                       preempted=preempted, failed_checkpoints=checkpointer.failed,
                       last_checkpoint_committed=last_committed)
