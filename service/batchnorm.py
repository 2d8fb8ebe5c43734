"""BatchNorm over the global batch on any device.

torch's SyncBatchNorm runs only on accelerators. On the CPU (gloo) its layers compute the global statistics
with differentiable all-reduces instead, so multi-process CPU runs are the same computation as GPU runs.
"""

from __future__ import annotations

import torch
from torch import nn

from service.distributed import all_reduce_sum, world_size


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, plus a path for devices it does not support (the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.training or world_size() == 1:
            return super().forward(x)
        reduce_dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1])))
        mean = all_reduce_sum(x.sum(reduce_dims)) / count
        centered = x - mean.view(shape)
        variance = all_reduce_sum(centered.square().sum(reduce_dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(variance * count / (count - 1), momentum)
        y = centered * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a SyncBatchNorm that also runs on the CPU. Keys and state are unchanged."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if type(layer) is nn.SyncBatchNorm:
            layer.__class__ = SyncBatchNorm  # same state, one more forward path
    return module
