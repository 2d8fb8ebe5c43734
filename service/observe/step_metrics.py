"""What a logged stats line measures beyond the loss: step time, throughput, data wait, memory, collapse.

Nothing here waits for the device. Wall times are read on the host at logged steps, where the loop reads the loss
and so waits for the device anyway: between two such points the host's clock measures the device's work too.
Data wait is the host's time inside the loader's `next()` (as torchtitan measures it): when the device is the
bottleneck the host is ahead and the loader answers at once; when the data is, the device idles meanwhile.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")

CORRELATION_IMAGE_SIZE = 64


# RankMe's sample: the first rows of the monitor's features, as many as Garrido et al. (ICML 2023) use. The rank
# cannot exceed the sample's size (nor the feature dimension): compare runs at the same sample, of one method.
RANKME_SAMPLE = 25_600
RANKME_EPSILON = 1e-7  # the paper's epsilon, added to each normalised singular value before the entropy
# With the kNN monitor off, RankMe is taken at logged steps of the step's own batch (the first view's features), at
# most this many rows: their Gram matrix (rows x rows, float64) travels with the step's other measurements
RANKME_STEP_ROWS = 512


def rankme(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
    representations by their rank", ICML 2023): exp of the entropy of the features' singular values normalised to
    sum 1, the effective rank of a (samples x dimension) matrix: 1 when every sample has the same direction, up to
    min(samples, dimension) when the features fill their space; 0 when every feature is zero (dead units: no
    direction at all, where the formula divides by zero). A label-free signal of (dimensional) collapse."""
    return _effective_rank(torch.linalg.svdvals(features.detach().double()))


def feature_gram(features: torch.Tensor, rows: int = RANKME_STEP_ROWS) -> torch.Tensor:
    """The Gram matrix of the first `rows` features, in float64, on their device (no sync): F F^T or F^T F, the
    smaller, whose min(rows, dimension) eigenvalues are the squared singular values of F (rankme_of_gram)."""
    sample = features.detach()[:rows].double()
    return sample @ sample.T if sample.shape[0] <= sample.shape[1] else sample.T @ sample


def rankme_of_gram(gram: torch.Tensor) -> float:
    """RankMe of the features whose Gram matrix F F^T this is (on the host): their singular values are the square
    roots of its eigenvalues."""
    return _effective_rank(torch.linalg.eigvalsh(gram.double()).clamp(min=0).sqrt())


def _effective_rank(singular: torch.Tensor) -> float:
    if not singular.sum() > 0:
        return 0.0
    p = singular / singular.sum() + RANKME_EPSILON
    return float(torch.exp(-(p * p.log()).sum()))


def correlation_magnitudes(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean |C_ii| and the mean |C_ij| (i != j) of the cross-correlation C: what Barlow Twins drives to 1
    (invariance: the two views agree in every dimension) and to 0 (redundancy reduction: the dimensions are
    decorrelated). 0-d tensors on C's device, read with the step's other measurements."""
    c = c.detach().float().abs()
    diagonal = c.diagonal().sum()
    dimension = c.shape[0]
    return diagonal / dimension, (c.sum() - diagonal) / (dimension * (dimension - 1))


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """The collapse signal (as lightly logs it): the mean over dimensions of the standard deviation over the batch
    of the L2-normalised embeddings. About 1/sqrt(D) for embeddings spread over the sphere, 0 when every input maps
    to the same point. A 0-d tensor on z's device."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def decimated(correlation: torch.Tensor, size: int = CORRELATION_IMAGE_SIZE) -> torch.Tensor:
    """Every (D // size)-th row and column of a D x D matrix, at most size x size. Decimation, not averaging:
    averaging blocks would dilute the diagonal (1 among D / size - 1 zeros) into the off-diagonal background."""
    stride = max(1, correlation.shape[0] // size)
    return correlation.detach()[::stride, ::stride][:size, :size]


class StepClock:
    """Wall time and loader wait on the host between two reads (logged steps)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget the time since the last read (after work that is not training, such as the kNN monitor)."""
        self.mark = time.perf_counter()
        self.waited = 0.0
        self.steps = 0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """`batches`, adding the time spent waiting for each one to the data wait."""
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - started
            yield batch

    def step_done(self) -> None:
        self.steps += 1

    def read(self) -> tuple[float, float]:
        """(seconds per step, fraction of the time spent waiting for data) since the last read; then restart."""
        elapsed = max(time.perf_counter() - self.mark, 1e-9)
        step_time = elapsed / max(self.steps, 1)
        data_wait = min(self.waited / elapsed, 1.0)
        self.restart()
        return step_time, data_wait


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the peak memory allocated on the device since the previous call (the caching allocator's counter,
    read on the host). CPU: the process's peak resident set since it started (the kernel keeps no other peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
