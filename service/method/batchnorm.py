"""BatchNorm over the global batch on any device.

On accelerators this is torch's SyncBatchNorm. torch's layer refuses the CPU (and DDP refuses it on CPU
modules), so on the CPU every BatchNorm becomes a `GlobalBatchNorm` that computes the global statistics with
differentiable all-reduces: multi-process CPU runs are then the same computation as GPU runs. The base class
`_BatchNorm` is private in torch; this module is the only place that touches it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from service.runtime.distributed import all_reduce_sum, world_size


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm of any dimensionality whose training statistics are those of the global batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input, got {x.ndim}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        reduce_dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = all_reduce_sum(x.sum(reduce_dims)) / count
        centered = x - mean.view(shape)
        variance = all_reduce_sum(centered.square().sum(reduce_dims)) / count
        if self.track_running_stats:
            # the buffers that track_running_stats=True creates (torch types them Optional)
            assert self.num_batches_tracked is not None
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(variance * count / (count - 1), momentum)
        y = centered * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        return converted
    for name, child in module.named_children():
        setattr(module, name, _to_global(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm layer normalise over the global batch. State-dict keys are unchanged."""
    if device.type == "cpu":
        return _to_global(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
