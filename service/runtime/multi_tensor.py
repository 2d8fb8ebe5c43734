"""The multi-tensor ("foreach") kernels the fused LARS step uses: one launch for a list of tensors instead of one
per parameter. They are torch's private `torch._foreach_*` operators (those torch's own optimizers run on); this is
the one module that names them."""

from __future__ import annotations

import torch


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, stacked."""
    return torch.stack(torch._foreach_norm(tensors)) if tensors else torch.zeros(0)


def add(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """[t + alpha * o], new tensors."""
    return list(torch._foreach_add(tensors, others, alpha=alpha))


def mul_(tensors: list[torch.Tensor], scalars: torch.Tensor | float) -> None:
    """t *= s in place, with one scalar for all (a number or a 0-d tensor) or a 1-d tensor of one per tensor."""
    if isinstance(scalars, torch.Tensor) and scalars.ndim == 1:  # one per tensor
        torch._foreach_mul_(tensors, list(scalars.unbind()))
    else:
        torch._foreach_mul_(tensors, scalars)


def add_(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float = 1.0) -> None:
    """t += alpha * o in place."""
    torch._foreach_add_(tensors, others, alpha=alpha)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: no NaN or infinity in any of them (read without a host sync)."""
    return torch.isfinite(norms(tensors).sum())
