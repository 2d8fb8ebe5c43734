"""The kNN monitor of a pretraining run (`monitor` in the spec): the probes' weighted kNN on the backbone, every N
epochs, logged to stats.txt with the RankMe of the same features (label-free: the effective rank)."""

from __future__ import annotations

from torch import nn

from service.data.datasets import labelled_images
from service.data.loader import Transformed
from service.evaluation.probes import gathered_features, knn_scores, topk_correct
from service.method.transforms import feature_pipeline
from service.observe.stats import TrainingStats
from service.observe.step_metrics import RANKME_SAMPLE, rankme
from service.runtime import distributed
from service.spec import TrainSpec


class KnnMonitor:
    """The kNN monitor (spec.monitor): top-1 of a weighted kNN classifier on the backbone's features, every N epochs.

    The labelled training images are the memory bank and the held-out split the queries; both are embedded in
    shares across the workers and gathered, so every worker computes the same accuracy. Nothing here trains. The
    bank's features, the first RANKME_SAMPLE of them in the data set's order (the same images at every pass),
    also give RankMe, logged with the sample's size (`rankme_sample`): the rank cannot exceed it.
    """

    def __init__(self, spec: TrainSpec, worker: distributed.Worker, loader_workers: int):
        self.spec = spec.monitor
        self.epochs = spec.optim.epochs
        self.worker = worker
        self.batch_size = max(1, 256 // worker.world_size)
        self.workers = loader_workers
        if self.spec.knn_every_epochs:
            transform = feature_pipeline(spec.data.image_size, spec.augment.mean, spec.augment.std)
            self.bank = Transformed(labelled_images(spec.data, train=True, storage=spec.storage), transform)
            self.queries = Transformed(labelled_images(spec.data, train=False, storage=spec.storage), transform)

    def due(self, epoch: int) -> bool:
        every = self.spec.knn_every_epochs
        if not every:
            return False
        return (epoch + 1) % every == 0 or epoch + 1 == self.epochs

    def run(self, backbone: nn.Module, epoch: int, step: int, stats: TrainingStats) -> float:
        bank = gathered_features(backbone, self.bank, self.worker, self.batch_size, self.workers)
        queries = gathered_features(backbone, self.queries, self.worker, self.batch_size, self.workers)
        scores = knn_scores(bank[0], bank[1], queries[0], int(bank[1].max()) + 1, k=self.spec.knn_k,
                            temperature=self.spec.knn_temperature)
        accuracy = 100 * topk_correct(scores, queries[1], ks=(1,))[0] / len(queries[1])
        if self.worker.rank == 0:  # only the main worker writes stats: the others skip the decomposition
            sample = bank[0][:RANKME_SAMPLE]
            stats.record(epoch=epoch, step=step, knn_top1=accuracy, rankme=rankme(sample), rankme_sample=len(sample))
        return accuracy
