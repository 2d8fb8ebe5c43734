"""Frozen-feature probes: the weighted kNN classifier, top-k accuracy, a linear probe and few-shot nearest neighbour.

The kNN classifier is the one self-supervised benchmarks use (InstDisc, DINO, solo-learn, lightly): cosine
similarity to every labelled training feature, the k most similar vote with weight exp(similarity / T).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from service.data.loader import CarryErrors, checked, collate
from service.runtime.distributed import Worker, shard


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the `k` highest scores, for each k (k capped at the class count)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, num_classes: int,
               k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of weighted kNN: the k most cosine-similar training features vote exp(similarity / T)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for queries in F.normalize(features.float(), dim=1).split(chunk):
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, dtype=similarity.dtype, device=similarity.device)
        scores.append(votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp()))
    return torch.cat(scores)


@torch.no_grad()
def gathered_features(network: nn.Module, images: Dataset, worker: Worker | None = None, batch_size: int = 256,
                      workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's outputs (in eval mode) and the labels of every image, in the data set's order: computed in
    shares by the workers and gathered on each of them (worker=None: one process, on the CPU)."""
    worker = worker or Worker(0, 1, 0, torch.device("cpu"))
    was_training = network.training
    network.eval()
    size = len(images)  # type: ignore[arg-type]  # torch's Dataset has no __len__
    mine = torch.utils.data.Subset(images, shard(size, worker.rank, worker.world_size))
    feature_batches: list[torch.Tensor] = []
    label_batches: list[torch.Tensor] = []
    for x, y in checked(DataLoader(CarryErrors(mine), batch_size=batch_size, num_workers=workers, collate_fn=collate)):
        feature_batches.append(network(x.to(worker.device)).float().cpu())
        label_batches.append(torch.as_tensor(y))
    network.train(was_training)
    features = torch.cat(feature_batches) if feature_batches else torch.zeros(0, 0)
    labels = torch.cat(label_batches) if label_batches else torch.zeros(0, dtype=torch.long)
    if worker.world_size == 1:
        return features, labels
    shares: list = [None] * worker.world_size
    dist.all_gather_object(shares, (features, labels))
    return torch.cat([f for f, _ in shares if len(f)]), torch.cat([y for _, y in shares])


def knn_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 k: int = 200, temperature: float = 0.1) -> float:
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    scores = knn_scores(train[0], train[1], test[0], num_classes, k=k, temperature=temperature)
    return topk_correct(scores, test[1], ks=(1,))[0] / len(test[1])


def linear_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Multinomial logistic regression (L-BFGS, L2) on standardised features: the frozen-feature linear probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train[0].numpy(), train[1].numpy())
    return float(probe.score(test[0].numpy(), test[1].numpy()))


def few_shot_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                      shots: int = 5, draws: int = 20, seed: int = 0) -> float:
    """Mean accuracy of 1-nearest-neighbour (cosine) on `shots` labelled images per class, over random draws."""
    rng = np.random.default_rng(seed)
    labels = train[1].numpy()
    accuracies = []
    for _ in range(draws):
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                                 for c in np.unique(labels)])
        scores = knn_scores(train[0][chosen], train[1][chosen], test[0], int(labels.max()) + 1, k=1)
        accuracies.append(topk_correct(scores, test[1], ks=(1,))[0] / len(test[1]))
    return float(np.mean(accuracies))
