"""LARS, its two parameter groups, and the warm-up + cosine learning-rate schedule of the reference."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.runtime import multi_tensor

if TYPE_CHECKING:
    from service.spec import OptimSpec


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the Barlow Twins reference implements it.

    Per parameter: dp = grad (+ weight_decay * p); dp *= eta * |p| / |dp| (when both norms are positive);
    mu = momentum * mu + dp; p -= lr * mu. Constructed like the reference:
    `LARS(parameter_groups(model), lr=0, weight_decay=1e-6, weight_decay_filter=True, lars_adaptation_filter=True)`.
    A true filter exempts one-dimensional parameters (biases and BatchNorm scales and shifts) from weight decay,
    respectively from the trust ratio. The reference exempts them whatever its filter flags say; here `False`
    means no exemption.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter: bool = False,
        lars_adaptation_filter: bool = False,
        foreach: bool = True,
    ):
        self.foreach = foreach
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _is_bias_or_norm(p: torch.Tensor) -> bool:
        return p.ndim == 1

    @torch.no_grad()
    def step(self, closure=None, *, apply: torch.Tensor | None = None):
        """One update. `apply`, a 0-d bool tensor on the device, makes it conditional without a host sync: where
        it is False (a non-finite step) every parameter and momentum buffer keeps its value."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.foreach:
                self._multi_tensor_step(group, apply)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                exempt = self._is_bias_or_norm(p)
                dp = p.grad
                if not (group["weight_decay_filter"] and exempt):
                    dp = dp.add(p, alpha=group["weight_decay"])
                if not (group["lars_adaptation_filter"] and exempt):
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(dp)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0.0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if apply is None:
                    mu.mul_(group["momentum"]).add_(dp)
                    p.add_(mu, alpha=-group["lr"])
                else:  # the same arithmetic on the applied path, nothing added on the other
                    mu.mul_(torch.where(apply, group["momentum"], 1.0)).add_(torch.where(apply, dp, 0.0))
                    p.add_(torch.where(apply, mu, 0.0), alpha=-group["lr"])
        return loss

    def _multi_tensor_step(self, group: dict, apply: torch.Tensor | None = None) -> None:
        """The same update as the per-parameter loop, over all of a group's tensors at once (no host sync)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        exempt = [self._is_bias_or_norm(p) for p in params]
        decayed = [i for i, e in enumerate(exempt) if not (group["weight_decay_filter"] and e)]
        # new tensors: the gradients themselves are never scaled
        with_decay = {}
        if decayed and group["weight_decay"]:
            with_decay = dict(zip(decayed, multi_tensor.add([params[i].grad for i in decayed],
                                                            [params[i] for i in decayed], alpha=group["weight_decay"])))
        updates = [with_decay[i] if i in with_decay else p.grad.clone() for i, p in enumerate(params)]
        adapted = [i for i, e in enumerate(exempt) if not (group["lars_adaptation_filter"] and e)]
        if adapted:
            param_norm = multi_tensor.norms([params[i] for i in adapted])
            update_norm = multi_tensor.norms([updates[i] for i in adapted])
            one = torch.ones_like(param_norm)
            trust = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0.0, group["eta"] * param_norm / update_norm, one), one)
            multi_tensor.mul_([updates[i] for i in adapted], trust)
        mus = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p)
            mus.append(state["mu"])
        if apply is None:
            multi_tensor.mul_(mus, group["momentum"])
            multi_tensor.add_(mus, updates)
            multi_tensor.add_(params, mus, alpha=-group["lr"])
            return
        # Bit for bit the update above where `apply` holds; where it does not, mu * 1 + 0 and p - lr * 0.
        multi_tensor.mul_(mus, torch.where(apply, group["momentum"], 1.0))
        multi_tensor.add_(mus, [torch.where(apply, update, 0.0) for update in updates])
        del updates
        multi_tensor.add_(params, [torch.where(apply, mu, 0.0) for mu in mus], alpha=-group["lr"])


def parameter_groups(model: nn.Module) -> list[dict]:
    """The reference's groups: weights (ndim > 1) first, then biases and BatchNorm parameters (ndim == 1)."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights}, {"params": biases}]


def build_lars(model: nn.Module, weight_decay: float, momentum: float, eta: float) -> LARS:
    return LARS(
        parameter_groups(model),
        lr=0.0,
        weight_decay=weight_decay,
        momentum=momentum,
        eta=eta,
        weight_decay_filter=True,
        lars_adaptation_filter=True,
    )


def lars_for(model: nn.Module, optim: OptimSpec) -> LARS:
    """The spec's LARS for `model`: what the trainer optimises with."""
    return build_lars(model, optim.weight_decay, optim.momentum, optim.eta)


def learning_rate_factor(step: int, *, total_steps: int, warmup_steps: int, batch_size: int) -> float:
    """The reference's per-step schedule before the per-group multipliers.

    base = batch_size / 256; linear warm-up from 0 over `warmup_steps`, then a cosine from base to base / 1000
    reached at `total_steps`.
    """
    base = batch_size / 256
    if step < warmup_steps:
        return base * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    end = base * 0.001
    return base * q + end * (1 - q)


class LearningRateSchedule:
    """Sets the two groups' learning rates for a global step: factor * lr_weights and factor * lr_biases."""

    def __init__(self, *, steps_per_epoch: int, epochs: int, warmup_epochs: float, batch_size: int,
                 lr_weights: float, lr_biases: float):
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = int(warmup_epochs * steps_per_epoch)
        self.batch_size = batch_size
        self.multipliers = (lr_weights, lr_biases)

    def __call__(self, step: int) -> tuple[float, float]:
        factor = learning_rate_factor(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, batch_size=self.batch_size
        )
        return factor * self.multipliers[0], factor * self.multipliers[1]

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        rates = self(step)
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        return rates
