"""The Barlow Twins loss (Zbontar et al. 2021, eq. 1 and 2), correct under data parallelism.

Each worker passes its own embeddings. The embeddings are normalised with the statistics of the global batch
(as the reference's affine-free SyncBatchNorm does in training mode), and the cross-correlation matrix is summed
over workers with a differentiable all-reduce, so every worker computes the loss of the global batch and DDP's
gradient average gives the single-process gradient. The reference's plain `all_reduce(c)` skipped that backward
and scaled every update by 1/world_size; `LossSpec.reference_world_size` reproduces it when asked.
"""

from __future__ import annotations

import torch

from service.distributed import all_reduce_sum, gather_rows, spans_nodes, world_size

BATCHNORM_EPS = 1e-5  # the eps of the reference's BatchNorm1d(affine=False)


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (the reference's helper)."""
    n, m = matrix.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {n}x{m}")
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _normalize_over_global_batch(z: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
    mean = all_reduce_sum(z.sum(dim=0)) / global_count
    centered = z - mean
    variance = all_reduce_sum(centered.square().sum(dim=0)) / global_count  # biased, as BatchNorm normalises
    return centered / torch.sqrt(variance + BATCHNORM_EPS)


def choose_communication(global_batch: int, dim: int, multi_node: bool) -> str:
    """`reduce` all-reduces the D x D matrix forward and its gradient backward (about 4 D^2 floats through each
    worker); `gather` all-gathers both views' embeddings (2 N D floats) but multiplies the whole batch on every
    worker. Gather where bytes are dear, across nodes, and fewer (N < 2 D); see bench/README.md."""
    return "gather" if multi_node and global_batch < 2 * dim else "reduce"


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, communication: str = "reduce") -> torch.Tensor:
    """The D x D cross-correlation of the two views' embeddings over the global batch.

    `reduce` (the reference's plan): local statistics and local partial matrices, summed over workers.
    `gather`: every worker gathers the global batch's embeddings and computes the whole matrix itself.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"both views need embeddings of one shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # Autocast would run the D x D product in half precision; the loss is computed in fp32 (cf. reference issue #53).
    with torch.autocast(device_type=z1.device.type, enabled=False):
        dtype = torch.promote_types(z1.dtype, torch.float32)  # fp32 at least, float64 stays float64
        z1, z2 = z1.to(dtype), z2.to(dtype)
        global_count = all_reduce_sum(torch.tensor(float(z1.shape[0]), device=z1.device))
        if communication == "auto":  # decided from the global batch: the same choice on every worker
            communication = choose_communication(int(global_count), z1.shape[1], spans_nodes())
        if communication == "gather" and world_size() > 1:
            z1, z2 = gather_rows(z1), gather_rows(z2)
            n1 = (z1 - z1.mean(dim=0)) / torch.sqrt(z1.var(dim=0, unbiased=False) + BATCHNORM_EPS)
            n2 = (z2 - z2.mean(dim=0)) / torch.sqrt(z2.var(dim=0, unbiased=False) + BATCHNORM_EPS)
            return n1.T @ n2 / global_count.detach()
        n1 = _normalize_over_global_batch(z1, global_count)
        n2 = _normalize_over_global_batch(z2, global_count)
        return all_reduce_sum(n1.T @ n2) / global_count


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051,
                      communication: str = "reduce") -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 for the global batch's cross-correlation C."""
    c = cross_correlation(z1, z2, communication)
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
