"""LARS, its parameter groups and the learning-rate schedule against hand computations
(facebookresearch/barlowtwins@8e8d284 `main.py`: parameter groups lines 90-99,
`adjust_learning_rate` lines 155-170, `LARS` lines 224-264).

LARS step: dp = grad (+ wd*p); for weights q = eta*|p|/|dp| if both norms > 0 else 1, dp *= q;
mu = 0.9*mu + dp; p -= lr*mu. Biases and BN parameters (ndim == 1) get neither weight decay nor the trust ratio.
Schedule: base = batch/256; linear warm-up from 0 over the warm-up steps, then a cosine from base to base/1000.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from service.method.optim import (
    LARS,
    LearningRateSchedule,
    build_lars,
    lars_for,
    learning_rate_factor,
    parameter_groups,
)
from service.spec import load_spec

WD = 0.1  # large, so that a weight decay applied to the wrong group shows
ETA = 0.02
MOMENTUM = 0.9


class TwoParams(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(bias, dtype=torch.float64))


def _hand_weight_update(p, g, mu, lr):
    """One reference LARS step for a weight (ndim > 1): weight decay, then the trust ratio."""
    dp = g + WD * p
    p_norm = math.sqrt(float((p**2).sum()))
    dp_norm = math.sqrt(float((dp**2).sum()))
    q = ETA * p_norm / dp_norm if p_norm > 0 and dp_norm > 0 else 1.0
    dp = dp * q
    mu = MOMENTUM * mu + dp
    return p - lr * mu, mu


def _hand_bias_update(p, g, mu, lr):
    """One reference LARS step for a bias/BN parameter (ndim == 1): neither weight decay nor trust ratio."""
    mu = MOMENTUM * mu + g
    return p - lr * mu, mu


W0 = np.array([[1.0, -2.0, 0.5], [0.3, 0.0, -1.5]])
B0 = np.array([0.4, -0.7])
GW = [np.array([[0.2, 0.1, -0.3], [0.05, -0.4, 0.25]]), np.array([[-0.1, 0.3, 0.2], [0.6, 0.1, -0.05]])]
GB = [np.array([0.5, -0.25]), np.array([-0.3, 0.8])]


def _model_and_optimizer():
    model = TwoParams(W0, B0)
    optimizer = build_lars(model, weight_decay=WD, momentum=MOMENTUM, eta=ETA)
    return model, optimizer


def test_one_step_matches_hand_computation():
    model, optimizer = _model_and_optimizer()
    lr_w, lr_b = 0.7, 0.3
    optimizer.param_groups[0]["lr"] = lr_w
    optimizer.param_groups[1]["lr"] = lr_b
    model.weight.grad = torch.tensor(GW[0])
    model.bias.grad = torch.tensor(GB[0])
    optimizer.step()

    # Written out: dp_w = g + wd*p; q = eta*|p|/|dp_w|; mu = dp_w*q; p -= lr*mu.
    dp_w = GW[0] + WD * W0
    q = ETA * np.linalg.norm(W0) / np.linalg.norm(dp_w)
    expected_w = W0 - lr_w * (q * dp_w)
    expected_b = B0 - lr_b * GB[0]  # no weight decay, no trust ratio
    np.testing.assert_allclose(model.weight.detach().numpy(), expected_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.bias.detach().numpy(), expected_b, rtol=1e-12, atol=1e-14)
    # The trust ratio really changed the step (q is far from 1 here), so the check above discriminates.
    assert q < 0.2


def test_momentum_over_two_steps():
    model, optimizer = _model_and_optimizer()
    lrs = [(0.5, 0.2), (0.9, 0.4)]
    p_w, mu_w = W0.copy(), np.zeros_like(W0)
    p_b, mu_b = B0.copy(), np.zeros_like(B0)
    for step in range(2):
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lrs[step]
        model.weight.grad = torch.tensor(GW[step])
        model.bias.grad = torch.tensor(GB[step])
        optimizer.step()
        p_w, mu_w = _hand_weight_update(p_w, GW[step], mu_w, lrs[step][0])
        p_b, mu_b = _hand_bias_update(p_b, GB[step], mu_b, lrs[step][1])
        np.testing.assert_allclose(model.weight.detach().numpy(), p_w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(model.bias.detach().numpy(), p_b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(optimizer.state[model.weight]["mu"].numpy(), mu_w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(optimizer.state[model.bias]["mu"].numpy(), mu_b, rtol=1e-12, atol=1e-14)
    # Explicitly: after two bias steps mu = 0.9*g0 + g1 (no dampening), not e.g. 0.9*g0 + 0.1*g1.
    np.testing.assert_allclose(mu_b, 0.9 * GB[0] + GB[1])
    np.testing.assert_allclose(
        model.bias.detach().numpy(), B0 - 0.2 * GB[0] - 0.4 * (0.9 * GB[0] + GB[1]), rtol=1e-12
    )


def test_zero_norm_weight_gets_trust_one():
    model = TwoParams(np.zeros((2, 3)), B0)
    optimizer = build_lars(model, weight_decay=WD, momentum=MOMENTUM, eta=ETA)
    optimizer.param_groups[0]["lr"] = 0.5
    model.weight.grad = torch.tensor(GW[0])
    model.bias.grad = torch.zeros(2, dtype=torch.float64)
    optimizer.step()
    # |p| = 0, so q = 1: the plain step (the weight decay term is zero too).
    np.testing.assert_allclose(model.weight.detach().numpy(), -0.5 * GW[0], rtol=1e-12)


def test_zero_gradient_weight_gets_trust_one():
    model = TwoParams(W0, B0)
    optimizer = build_lars(model, weight_decay=0.0, momentum=MOMENTUM, eta=ETA)
    optimizer.param_groups[0]["lr"] = 0.5
    model.weight.grad = torch.zeros(2, 3, dtype=torch.float64)
    optimizer.step()
    # |dp| = 0: q = 1 (no division by zero, no NaN); the weight does not move.
    assert torch.isfinite(model.weight).all()
    np.testing.assert_allclose(model.weight.detach().numpy(), W0)


def test_parameter_without_gradient_is_skipped():
    model, optimizer = _model_and_optimizer()
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 1.0
    model.weight.grad = torch.tensor(GW[0])
    optimizer.step()
    np.testing.assert_array_equal(model.bias.detach().numpy(), B0)


def test_unfiltered_lars_applies_decay_and_trust_to_vectors():
    # With the filters off, a 1-d parameter is treated like a weight (the flags are real switches).
    bias = nn.Parameter(torch.tensor(B0))
    optimizer = LARS([bias], lr=0.5, weight_decay=WD, momentum=MOMENTUM, eta=ETA)
    bias.grad = torch.tensor(GB[0])
    optimizer.step()
    dp = GB[0] + WD * B0
    q = ETA * np.linalg.norm(B0) / np.linalg.norm(dp)
    np.testing.assert_allclose(bias.detach().numpy(), B0 - 0.5 * q * dp, rtol=1e-12)


def test_lars_defaults():
    optimizer = LARS([nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9
    assert group["eta"] == 0.001
    assert group["weight_decay"] == 0


def test_the_trainers_lars_takes_every_hyperparameter_from_the_spec():
    """Values unlike the defaults, so that a setting the trainer drops or swaps shows."""
    settings = ["data.dataset=digits", "optim.weight_decay=3e-5", "optim.momentum=0.7", "optim.eta=0.02"]
    optim = load_spec(None, settings).optim
    optimizer = lars_for(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), optim)
    assert [(group["weight_decay"], group["momentum"], group["eta"]) for group in optimizer.param_groups] == [
        (3e-5, 0.7, 0.02)] * 2


def test_build_lars_sets_reference_hyperparameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = build_lars(model, weight_decay=1e-6, momentum=0.9, eta=0.001)
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 1e-6
        assert group["momentum"] == 0.9
        assert group["eta"] == 0.001
        assert group["weight_decay_filter"] is True
        assert group["lars_adaptation_filter"] is True


def test_parameter_groups_split_by_ndim():
    model = nn.Sequential(
        nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.Conv2d(3, 2, 1)
    )
    groups = parameter_groups(model)
    assert len(groups) == 2
    weights, biases = (list(g["params"]) for g in groups)
    expected_weights = [model[0].weight, model[3].weight, model[4].weight]
    expected_biases = [model[1].weight, model[1].bias, model[3].bias, model[4].bias]
    assert [id(p) for p in weights] == [id(p) for p in expected_weights]
    assert {id(p) for p in biases} == {id(p) for p in expected_biases}
    assert all(p.ndim > 1 for p in weights)
    assert all(p.ndim == 1 for p in biases)
    # Every parameter lands in exactly one group.
    assert len(weights) + len(biases) == len(list(model.parameters()))


# ----- learning-rate schedule -----

BATCH = 2048
LR_W, LR_B = 0.2, 0.0048
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 7, 30, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS
WARM = STEPS_PER_EPOCH * WARMUP_EPOCHS


def _schedule():
    return LearningRateSchedule(
        steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, warmup_epochs=WARMUP_EPOCHS,
        batch_size=BATCH, lr_weights=LR_W, lr_biases=LR_B,
    )


def _closed_form(step):
    base = BATCH / 256
    if step < WARM:
        return base * step / WARM
    q = 0.5 * (1 + math.cos(math.pi * (step - WARM) / (TOTAL - WARM)))
    return base * q + base / 1000 * (1 - q)


def test_schedule_starts_at_zero():
    assert _schedule()(0) == (0.0, 0.0)


def test_schedule_peaks_at_end_of_warmup():
    lr_w, lr_b = _schedule()(WARM)
    assert lr_w == pytest.approx(1.6, rel=1e-12)
    assert lr_b == pytest.approx(0.0384, rel=1e-12)
    # And it is the maximum over the whole run.
    all_w = [_schedule()(s)[0] for s in range(TOTAL)]
    assert max(all_w) == pytest.approx(1.6, rel=1e-12)
    assert int(np.argmax(all_w)) == WARM


def test_schedule_last_step_closed_form():
    last = TOTAL - 1
    base = BATCH / 256
    q = 0.5 * (1 + math.cos(math.pi * (last - WARM) / (TOTAL - WARM)))
    factor = base * q + base / 1000 * (1 - q)
    lr_w, lr_b = _schedule()(last)
    assert lr_w == pytest.approx(factor * LR_W, rel=1e-12)
    assert lr_b == pytest.approx(factor * LR_B, rel=1e-12)
    # Close to (but just above) the floor base/1000.
    assert base / 1000 * LR_W < lr_w < 2 * base / 1000 * LR_W


def test_schedule_matches_closed_form_everywhere():
    schedule = _schedule()
    for step in range(TOTAL):
        lr_w, lr_b = schedule(step)
        assert lr_w == pytest.approx(_closed_form(step) * LR_W, rel=1e-12, abs=1e-15)
        assert lr_b == pytest.approx(_closed_form(step) * LR_B, rel=1e-12, abs=1e-15)


def test_warmup_is_linear_and_monotone():
    schedule = _schedule()
    rates = [schedule(step)[0] for step in range(WARM + 1)]
    assert all(b > a for a, b in zip(rates, rates[1:]))
    steps = np.diff(rates)
    np.testing.assert_allclose(steps, 1.6 / WARM, rtol=1e-9)
    decay = [schedule(step)[0] for step in range(WARM, TOTAL)]
    assert all(b < a for a, b in zip(decay, decay[1:]))


def test_learning_rate_factor_function():
    assert learning_rate_factor(0, total_steps=100, warmup_steps=10, batch_size=256) == 0.0
    assert learning_rate_factor(5, total_steps=100, warmup_steps=10, batch_size=256) == pytest.approx(0.5)
    assert learning_rate_factor(10, total_steps=100, warmup_steps=10, batch_size=512) == pytest.approx(2.0)
    # Halfway through the cosine: q = 0.5.
    assert learning_rate_factor(55, total_steps=100, warmup_steps=10, batch_size=256) == pytest.approx(
        0.5 + 0.001 * 0.5
    )
    assert learning_rate_factor(100, total_steps=100, warmup_steps=10, batch_size=256) == pytest.approx(0.001)


def test_fractional_warmup_epochs():
    schedule = LearningRateSchedule(
        steps_per_epoch=10, epochs=5, warmup_epochs=0.5, batch_size=256, lr_weights=1.0, lr_biases=1.0
    )
    assert schedule(5)[0] == pytest.approx(1.0)
    assert schedule(4)[0] == pytest.approx(0.8)


def test_apply_sets_param_group_rates():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = build_lars(model, weight_decay=1e-6, momentum=0.9, eta=0.001)
    schedule = _schedule()
    step = WARM + 17
    returned = schedule.apply(optimizer, step)
    expected = _closed_form(step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected * LR_W, rel=1e-12)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(expected * LR_B, rel=1e-12)
    assert returned == (optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"])
    schedule.apply(optimizer, 0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]


def test_multi_tensor_lars_equals_the_per_parameter_lars_over_several_steps():
    from service.method.model import BarlowTwins
    from service.method.optim import build_lars
    from service.spec import ModelSpec

    torch.manual_seed(0)
    reference = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="64-32"))
    fused = copy.deepcopy(reference)
    optimizers = []
    for model, foreach in ((reference, False), (fused, True)):
        optimizer = build_lars(model, weight_decay=1.5e-6, momentum=0.9, eta=0.001)
        optimizer.foreach = foreach
        optimizers.append(optimizer)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        y1, y2 = torch.randn(8, 3, 16, 16, generator=generator), torch.randn(8, 3, 16, 16, generator=generator)
        for model, optimizer in zip((reference, fused), optimizers):
            for group, lr in zip(optimizer.param_groups, (0.2, 0.0048)):
                group["lr"] = lr
            optimizer.zero_grad()
            z1, z2, _ = model(y1, y2)
            (z1 - z2).pow(2).sum().backward()
            model.projector[-1].weight.grad = None if step == 2 else model.projector[-1].weight.grad  # skipped
            optimizer.step()
    for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=name)
    for a, b in zip(reference.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(optimizers[1].state[b]["mu"], optimizers[0].state[a]["mu"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("foreach", [True, False])
def test_a_step_not_applied_leaves_parameters_and_momentum_exactly_unchanged(foreach):
    from service.method.model import BarlowTwins
    from service.method.optim import build_lars
    from service.spec import ModelSpec

    def train(steps: list[bool | None]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="32-16"))
        optimizer = build_lars(model, weight_decay=1.5e-6, momentum=0.9, eta=0.001)
        optimizer.foreach = foreach
        generator = torch.Generator().manual_seed(1)
        for apply in steps:
            for group, lr in zip(optimizer.param_groups, (0.2, 0.0048)):
                group["lr"] = lr
            optimizer.zero_grad()
            z1, z2, _ = model(torch.randn(8, 3, 8, 8, generator=generator),
                              torch.randn(8, 3, 8, 8, generator=generator))
            (z1 - z2).pow(2).sum().backward()
            if apply is False:  # a diverged step: its gradients are garbage
                for p in model.parameters():
                    p.grad.fill_(float("nan"))
            optimizer.step(apply=None if apply is None else torch.tensor(apply))
        params = list(model.parameters())
        return [p.detach().clone() for p in params] + [optimizer.state[p]["mu"].clone() for p in params]

    plain = train([None, None])
    applied = train([True, True])
    skipped = train([True, True, False])
    for a, b, c in zip(plain, applied, skipped, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)  # bit for bit: the conditional path is the same arithmetic
