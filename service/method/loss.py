"""The Barlow Twins loss (Zbontar et al. 2021, eq. 1 and 2), correct under data parallelism.

Each worker passes its own embeddings. The embeddings are normalised with the statistics of the global batch
(as the reference's affine-free SyncBatchNorm does in training mode), and the cross-correlation matrix is summed
over workers with a differentiable all-reduce, so every worker computes the loss of the global batch and DDP's
gradient average gives the single-process gradient. The reference's plain `all_reduce(c)` skipped that backward
and scaled every update by 1/world_size; `LossSpec.reference_world_size` reproduces it when asked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from service.runtime.distributed import (
    all_reduce_sum,
    gather_rows,
    rank,
    row_counts,
    scale_grad_by_world,
    spans_nodes,
    world_size,
)

BATCHNORM_EPS = 1e-5  # the eps of the reference's BatchNorm1d(affine=False)


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (the reference's helper)."""
    n, m = matrix.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {n}x{m}")
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _normalize_over_global_batch(z: torch.Tensor, global_count: torch.Tensor | int) -> torch.Tensor:
    mean = all_reduce_sum(z.sum(dim=0)) / global_count
    centered = z - mean
    variance = all_reduce_sum(centered.square().sum(dim=0)) / global_count  # biased, as BatchNorm normalises
    return centered / torch.sqrt(variance + BATCHNORM_EPS)


def choose_communication(global_batch: int, dim: int, multi_node: bool) -> str:
    """`reduce` all-reduces the D x D matrix forward and its gradient backward (about 4 D^2 floats through each
    worker); `gather` all-gathers both views' embeddings (2 N D floats) but multiplies the whole batch forward on
    every worker (backward: its own rows only). Gather where bytes are dear, across nodes, and fewer (N < 2 D); see
    bench/README.md."""
    return "gather" if multi_node and global_batch < 2 * dim else "reduce"


def cross_correlation_of_own_rows(z1: torch.Tensor, z2: torch.Tensor, others1: torch.Tensor,
                                  others2: torch.Tensor) -> torch.Tensor:
    """The cross-correlation of the batch made of own rows `z1`, `z2` and constant rows `others1`, `others2`.

    Its value is the plain formula's; its gradient reaches the own rows only, and the backward costs their
    product alone (N_own D^2) plus D x D elementwise work, not the whole batch's. The others are centred by the
    detached batch mean (no cancellation) and multiplied without grad; the mean's gradient enters through
    delta = mean - detached mean, zero in value: sum_oth (c - delta)_i (c' - delta')_j
    = P_ij - u_i delta'_j - delta_i u'_j + n_oth delta_i delta'_j, with P = c^T c' and u = sum_oth c.
    """
    count, n_others = z1.shape[0] + others1.shape[0], others1.shape[0]

    def statistics(z: torch.Tensor, others: torch.Tensor):
        detached_mean = (z.detach().sum(dim=0) + others.sum(dim=0)) / count
        delta = (z - z.detach()).sum(dim=0) / count
        centred_others = others - detached_mean
        u = centred_others.sum(dim=0)
        own = z - detached_mean - delta
        variance = (own.square().sum(dim=0) + centred_others.square().sum(dim=0) - 2 * delta * u
                    + n_others * delta.square()) / count  # biased, as BatchNorm normalises
        scale = torch.sqrt(variance + BATCHNORM_EPS)
        return own / scale, centred_others, u / scale, delta / scale, scale

    n1, c1, a1, e1, s1 = statistics(z1, others1)
    n2, c2, a2, e2, s2 = statistics(z2, others2)
    with torch.no_grad():
        product = c1.T @ c2
    # The delta terms over s s'^T, -a e'^T - e a'^T + n_oth e e'^T, ride as two more rows of the own product:
    # a memory-bound D x D elementwise pass (forward and backward) costs more than tens of the product's rows.
    rows1 = torch.cat([n1, -a1[None], e1[None]])
    rows2 = torch.cat([n2, e2[None], (n_others * e2 - a2)[None]])
    others_part = product * (1 / (count * s1))[:, None] * (1 / s2)[None, :]
    return torch.addmm(others_part, rows1.T, rows2, alpha=1 / count)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, communication: str = "reduce", *,
                      global_batch: int | None = None) -> torch.Tensor:
    """The D x D cross-correlation of the two views' embeddings over the global batch.

    `reduce` (the reference's plan): local statistics and local partial matrices, summed over workers.
    `gather`: every worker gathers the global batch's embeddings (detached) and computes the whole matrix itself,
    differentiably in its own rows only (cross_correlation_of_own_rows).
    `global_batch`, when the caller knows it (the training loop does), makes every worker's row count its
    `shard` of it: no count is exchanged and nothing here waits for the device. Without it the counts are
    measured, which waits for the device under `auto` and `gather`.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"both views need embeddings of one shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # Autocast would run the D x D product in half precision; the loss is computed in fp32 (cf. reference issue #53).
    with torch.autocast(device_type=z1.device.type, enabled=False):
        dtype = torch.promote_types(z1.dtype, torch.float32)  # fp32 at least, float64 stays float64
        z1, z2 = z1.to(dtype), z2.to(dtype)
        counts = None
        global_count: int | torch.Tensor
        if global_batch is not None:
            counts = row_counts(z1.shape[0], global_batch)  # checks this worker holds its share
            global_count = global_batch
        else:  # torch.full, not torch.tensor: no pageable host-to-device copy
            global_count = all_reduce_sum(torch.full((), float(z1.shape[0]), dtype=dtype, device=z1.device))
        if communication == "auto":  # decided from the global batch: the same choice on every worker
            communication = choose_communication(int(global_count), z1.shape[1], spans_nodes())
        if communication == "gather" and world_size() > 1:
            if counts is None:
                counts = row_counts(z1.shape[0], device=z1.device)
            me = rank()
            parts1, parts2 = gather_rows(z1, counts), gather_rows(z2, counts)
            others1 = torch.cat(parts1[:me] + parts1[me + 1:])
            others2 = torch.cat(parts2[:me] + parts2[me + 1:])
            return cross_correlation_of_own_rows(scale_grad_by_world(z1), scale_grad_by_world(z2), others1, others2)
        n1 = _normalize_over_global_batch(z1, global_count)
        n2 = _normalize_over_global_batch(z2, global_count)
        return all_reduce_sum(n1.T @ n2) / global_count


class LossTerms(NamedTuple):
    """The loss's parts for one global batch: its cross-correlation C, sum_i (1 - C_ii)^2 (invariance) and
    sum_{i != j} C_ij^2 (redundancy reduction, before lambd)."""

    correlation: torch.Tensor
    on_diag: torch.Tensor
    off_diag: torch.Tensor


def barlow_twins_terms(z1: torch.Tensor, z2: torch.Tensor, communication: str = "reduce", *,
                       global_batch: int | None = None) -> LossTerms:
    c = cross_correlation(z1, z2, communication, global_batch=global_batch)
    return LossTerms(c, torch.diagonal(c).add(-1).pow(2).sum(), off_diagonal(c).pow(2).sum())


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051,
                      communication: str = "reduce", *, global_batch: int | None = None) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 for the global batch's cross-correlation C."""
    terms = barlow_twins_terms(z1, z2, communication, global_batch=global_batch)
    return terms.on_diag + lambd * terms.off_diag
