"""Evaluation of a pretrained backbone: the reference's linear probe and semi-supervised finetuning, and kNN.

    barlow evaluate specs/digits-linear.yaml
    torchrun --standalone --nproc-per-node 2 -m service evaluate specs/digits-linear.yaml

As the reference's evaluate.py: a torchvision ResNet with the pretrained backbone and a new fc (weights N(0, 0.01),
bias 0); SGD with momentum over the fc (linear: the backbone frozen, kept in eval mode and checked unchanged every
epoch) or over both with their own learning rates (finetune); cosine annealing per epoch; top-1/top-5 on the
held-out split after every epoch, the best kept. Unlike the reference, each rank evaluates its own contiguous
share of the held-out split and the counts are summed, so every image is counted exactly once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from service.checkpoint.export import load_pretrained, write_backbone
from service.checkpoint.manager import CheckpointManager
from service.data.datasets import ImageFolder, LabelledImages, labelled_images, targets_of
from service.data.loader import CarryErrors, LoaderSettings, Transformed, checked, collate
from service.data.shard_reader import ShardedImages
from service.data.subsets import balanced_indices, indices_from_list, read_subset_list
from service.errors import DataError
from service.evaluation.probes import gathered_features, knn_scores, topk_correct
from service.method.model import BACKBONE_FEATURES, build_backbone
from service.method.transforms import classification_pipelines
from service.observe.stats import TrainingStats
from service.run import layout
from service.run.lease import own_output
from service.runtime import distributed
from service.runtime.distributed import shard
from service.runtime.precision import Precision
from service.spec import EvaluateSpec
from service.storage.filesystem import write_bytes

log = logging.getLogger("barlow")


class BackboneChanged(RuntimeError):
    """The linear probe's frozen backbone changed: the evaluation would not measure the pretrained features."""


@dataclass
class EvaluationResult:
    mode: str
    acc1: float
    acc5: float
    best_acc1: float
    best_acc5: float
    epochs: int
    train_images: int
    output: str


class Classifier(nn.Module):
    """A torchvision ResNet with its fc, and the accuracies so far (saved with the checkpoints, so that a resumed
    evaluation reports them): last top-1, last top-5, best top-1, best top-5."""

    accuracies: torch.Tensor  # the buffer registered in __init__

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.register_buffer("accuracies", torch.zeros(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def build_network(spec: EvaluateSpec, num_classes: int) -> nn.Module:
    """The ResNet with the pretrained backbone (or its random initialisation) and a new fc, as the reference."""
    network = build_backbone(spec.backbone.arch, spec.backbone.stem)
    network.fc = nn.Linear(BACKBONE_FEATURES[spec.backbone.arch], num_classes)
    if spec.backbone.weights:
        weights = {k: v for k, v in load_pretrained(spec.backbone.weights, spec.storage).items()
                   if not k.startswith("fc.")}
        missing, unexpected = network.load_state_dict(weights, strict=False)
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise DataError(f"backbone.weights {spec.backbone.weights} do not fit backbone.arch={spec.backbone.arch} "
                            f"stem={spec.backbone.stem}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    network.fc.weight.data.normal_(mean=0.0, std=0.01)
    network.fc.bias.data.zero_()
    return network


def training_indices(spec: EvaluateSpec, images: LabelledImages) -> list[int] | None:
    """The labelled training subset: None for all of it."""
    data = spec.data
    if data.train_percent == 100:
        return None
    if data.subset_list:
        if not isinstance(images, (ImageFolder, ShardedImages)):
            raise DataError("data.subset_list names image files: it needs data.dataset imagefolder or shards")
        names = read_subset_list(data.subset_list, spec.storage)
        return indices_from_list(images.sample_paths(), names, data.subset_list)
    return balanced_indices(targets_of(images), data.train_percent, data.subset_seed)


def backbone_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items() if not k.startswith("fc.")}


@torch.no_grad()
def count_correct(model: nn.Module, images: Dataset, worker: distributed.Worker, batch_size: int, workers: int,
                  precision: Precision) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) over the whole held-out split, each rank counting its own share."""
    model.eval()
    size = len(images)  # type: ignore[arg-type]  # torch's Dataset has no __len__
    mine = torch.utils.data.Subset(images, shard(size, worker.rank, worker.world_size))
    counts = torch.zeros(3, dtype=torch.float64)
    for x, y in checked(DataLoader(CarryErrors(mine), batch_size=batch_size, num_workers=workers, collate_fn=collate)):
        with precision.autocast():
            logits = model(x.to(worker.device, non_blocking=True))
        top1, top5 = topk_correct(logits.float().cpu(), y)
        counts += torch.tensor([top1, top5, len(y)], dtype=torch.float64)
    if worker.world_size > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1]), int(counts[2])


def evaluate(spec: EvaluateSpec, command: str, force: bool = False) -> EvaluationResult:
    worker = distributed.start(spec.run.device)
    try:
        return _evaluate(spec, command, worker, force)
    finally:
        distributed.stop()


def _evaluate(spec: EvaluateSpec, command: str, worker: distributed.Worker, force: bool) -> EvaluationResult:
    torch.manual_seed(spec.run.seed)
    train_transform, val_transform = classification_pipelines(spec.data)
    train_images = labelled_images(spec.data, train=True, storage=spec.storage)
    val_images = labelled_images(spec.data, train=False, storage=spec.storage)
    indices = training_indices(spec, train_images)
    num_classes = max(targets_of(train_images)) + 1
    network = build_network(spec, num_classes).to(worker.device)
    pretrained = backbone_state(network)
    precision = Precision.choose(spec.run.precision, worker.device)
    per_rank_batch = max(1, spec.eval.batch_size // worker.world_size)
    train_count = len(indices) if indices is not None else len(train_images)
    loading = LoaderSettings.choose(spec.data, batch_bytes=per_rank_batch * 3 * spec.data.image_size ** 2 * 4,
                                    local_workers=distributed.local_world_size(), cuda=worker.device.type == "cuda")

    if spec.eval.mode == "knn":  # no training, so no checkpoints and no lease
        if worker.is_main:
            layout.write_spec(spec.run.output, spec.storage, spec)
        network.fc = nn.Identity()
        bank = gathered_features(network, Transformed(train_images, val_transform, indices), worker,
                                 per_rank_batch, loading.workers)
        queries = gathered_features(network, Transformed(val_images, val_transform), worker, per_rank_batch,
                                    loading.workers)
        scores = knn_scores(bank[0], bank[1], queries[0], num_classes, k=spec.eval.knn_k,
                            temperature=spec.eval.knn_temperature)
        top1, top5 = topk_correct(scores, queries[1])
        acc1, acc5 = 100 * top1 / len(queries[1]), 100 * top5 / len(queries[1])
        result = EvaluationResult("knn", acc1, acc5, acc1, acc5, 0, train_count, spec.run.output)
        stats = TrainingStats(spec.run.output, spec.storage, command, total_steps=0, enabled=worker.is_main)
        stats.record(mode="knn", k=spec.eval.knn_k, acc1=acc1, acc5=acc5)
        stats.close()
        _write_results(spec, result, worker)
        return result

    model = Classifier(network).to(worker.device)
    frozen = spec.eval.mode == "linear"
    if frozen:
        network.requires_grad_(False)
        network.fc.requires_grad_(True)
    assert isinstance(network.fc, nn.Module)  # build_network's new fc
    # EvalSpec fills every unset hyper-parameter in with the reference's value for the mode
    assert spec.eval.epochs is not None and spec.eval.weight_decay is not None
    groups = [dict(params=list(network.fc.parameters()), lr=spec.eval.lr_classifier)]
    if not frozen:
        groups.append(dict(params=[p for n, p in network.named_parameters() if not n.startswith("fc.")],
                           lr=spec.eval.lr_backbone))
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=spec.eval.momentum, weight_decay=spec.eval.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, spec.eval.epochs)
    trained = DistributedDataParallel(model) if worker.world_size > 1 else model

    train_set = Transformed(train_images, train_transform, indices, seed=spec.run.seed)
    sampler: DistributedSampler[tuple[torch.Tensor, int]] = DistributedSampler(
        train_set, num_replicas=worker.world_size, rank=worker.rank, seed=spec.run.seed)
    loader = DataLoader(CarryErrors(train_set), batch_size=per_rank_batch, sampler=sampler, drop_last=False,
                        collate_fn=collate, **loading.loader_options(persistent=False))  # Transformed's epoch changes
    val_set = Transformed(val_images, val_transform)
    steps_per_epoch = len(loader)
    scaler = precision.grad_scaler()
    lease, group = own_output(spec.run.output, spec.storage, worker, timeout_s=spec.checkpoint.lease_timeout,
                              force=force)
    checkpointer = CheckpointManager(
        run_url=spec.run.output, spec=spec.checkpoint, storage=spec.storage, worker=worker, model=model,
        optimizer=optimizer, scaler=scaler, steps_per_epoch=steps_per_epoch, resolved_spec=spec.model_dump(mode="json"),
        lease=lease, group=group,
    )
    try:
        step = checkpointer.restore()
        # after the restore: a resume it refuses (a recipe changed without allow_changes) keeps the run's spec.yaml
        if worker.is_main:
            layout.write_spec(spec.run.output, spec.storage, spec)
    except BaseException:
        checkpointer.close()
        if lease is not None:  # given back now: a corrected rerun need not wait for it to go stale
            lease.release()
        raise
    first_epoch = -(-step // steps_per_epoch)  # evaluation checkpoints are taken at epoch ends
    for _ in range(first_epoch):
        scheduler.step()
    stats = TrainingStats(spec.run.output, spec.storage, command, total_steps=spec.eval.epochs * steps_per_epoch,
                          enabled=worker.is_main)
    stats.advance(first_epoch * steps_per_epoch)
    criterion = nn.CrossEntropyLoss()
    log.info("%s evaluation of %s on %d training images, %d held out, %d worker(s)", spec.eval.mode,
             spec.backbone.weights or "a randomly initialised backbone", train_count, len(val_set), worker.world_size)
    try:
        for epoch in range(first_epoch, spec.eval.epochs):
            model.eval() if frozen else model.train()  # the reference keeps the frozen backbone's BN statistics
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            for x, y in checked(loader):
                x, y = x.to(worker.device, non_blocking=True), y.to(worker.device, non_blocking=True)
                with precision.autocast():
                    loss = criterion(trained(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if step % spec.run.log_every == 0:
                    lrs = [group["lr"] for group in optimizer.param_groups]
                    stats.record(epoch=epoch, step=step, lr_backbone=lrs[1] if len(lrs) > 1 else 0.0,
                                 lr_head=lrs[0], loss=loss.item())
                stats.advance()
                step += 1
            scheduler.step()
            top1, top5, seen = count_correct(model, val_set, worker, per_rank_batch, loading.workers, precision)
            acc1, acc5 = 100 * top1 / seen, 100 * top5 / seen
            best1, best5 = max(acc1, float(model.accuracies[2])), max(acc5, float(model.accuracies[3]))
            model.accuracies.copy_(torch.tensor([acc1, acc5, best1, best5], dtype=torch.float64))
            stats.record(epoch=epoch, acc1=acc1, acc5=acc5, best_acc1=best1, best_acc5=best5)
            if frozen:
                _check_unchanged(pretrained, network)
            checkpointer.save(step)
            stats.sync()
    finally:
        try:
            checkpointer.close()
        finally:
            if lease is not None:
                lease.release()
            stats.close()
    acc1, acc5, best1, best5 = model.accuracies.tolist()
    result = EvaluationResult(spec.eval.mode, acc1, acc5, best1, best5, spec.eval.epochs, train_count, spec.run.output)
    if worker.is_main:
        write_backbone(network.state_dict(), layout.under(spec.run.output, layout.CLASSIFIER), spec.storage)
    _write_results(spec, result, worker)
    return result


def _check_unchanged(pretrained: dict[str, torch.Tensor], network: nn.Module) -> None:
    """As the reference: the frozen backbone's every tensor (weights and BN statistics) equals the loaded one."""
    for key, value in network.state_dict().items():
        if not key.startswith("fc.") and not torch.equal(value.cpu(), pretrained[key]):
            raise BackboneChanged(f"the frozen backbone's {key} changed during the linear probe")


def _write_results(spec: EvaluateSpec, result: EvaluationResult, worker: distributed.Worker) -> None:
    if worker.is_main:
        write_bytes(layout.under(spec.run.output, layout.RESULTS), spec.storage,
                    json.dumps(asdict(result), indent=1).encode())
    distributed.barrier()
