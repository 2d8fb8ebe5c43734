"""service/train/step.py: the training step's precision handling (autocast and loss scaling as the spec and the device
ask), the guard of non-finite steps, and the loss terms it reports. Compiled training is tests/e2e/test_trainer.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.method.loss import barlow_twins_terms
from service.method.model import BarlowTwins
from service.method.optim import build_lars
from service.runtime.precision import Precision
from service.spec import LossSpec, ModelSpec
from service.train.step import read_logged_step, training_step


def tiny_model_and_lars(device: str = "cpu") -> tuple[BarlowTwins, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="32-16")).to(device)
    optimizer = build_lars(model, weight_decay=1e-6, momentum=0.9, eta=0.001)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    return model, optimizer


def test_bf16_step_runs_the_network_in_bf16_and_the_loss_in_fp32():
    model, optimizer = tiny_model_and_lars()
    precision = Precision.choose("bf16", torch.device("cpu"))
    seen = []
    model.projector.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = model.backbone.conv1.weight.detach().clone()
    loss = training_step(model, optimizer, precision.grad_scaler(), precision, LossSpec(),
                         torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)).loss
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.backbone.conv1.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(model.backbone.conv1.weight, before)


@pytest.mark.parametrize("poison", ["input", "none"])
def test_the_guard_skips_a_non_finite_step_and_remembers_it(poison):
    from service.runtime.guard import NonFiniteGuard

    model, optimizer = tiny_model_and_lars()
    precision = Precision.choose("fp32", torch.device("cpu"))
    guard = NonFiniteGuard(torch.device("cpu"), first_step=40)
    y1, y2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    training_step(model, optimizer, precision.grad_scaler(), precision, LossSpec(), y1, y2, guard=guard)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    if poison == "input":
        y1 = y1.clone()
        y1[0, 0, 0, 0] = float("nan")
    loss = training_step(model, optimizer, precision.grad_scaler(), precision, LossSpec(), y1, y2, guard=guard).loss
    assert guard.first_bad_step() == (41 if poison == "input" else None)
    assert torch.isfinite(loss) == (poison == "none")
    unchanged = all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert unchanged == (poison == "input")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
@pytest.mark.parametrize("precision_name", ["fp32", "bf16"])
def test_the_guarded_step_never_waits_for_the_device(precision_name):
    from service.runtime.guard import NonFiniteGuard

    device = torch.device("cuda")
    model, optimizer = tiny_model_and_lars("cuda")
    precision = Precision.choose(precision_name, device)
    scaler = precision.grad_scaler()
    guard = NonFiniteGuard(device, first_step=0)
    y1, y2 = torch.randn(8, 3, 8, 8, device=device), torch.randn(8, 3, 8, 8, device=device)
    training_step(model, optimizer, scaler, precision, LossSpec(), y1, y2, 8, guard)  # LARS state created
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        for _ in range(2):
            training_step(model, optimizer, scaler, precision, LossSpec(), y1, y2, 8, guard)
            training_step(model, optimizer, scaler, precision, LossSpec(), y1, y2, 8, guard, observe=True, rank=True)
        with pytest.raises(RuntimeError):  # reading the flag is the one wait, at logged steps and saves
            guard.first_bad_step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert guard.first_bad_step() is None


# --- the measurements, by hand ---

def test_the_loss_terms_are_the_papers_two_sums_and_add_up_to_the_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    terms = barlow_twins_terms(z1, z2)
    # an independent computation: standardise each view over the batch (biased, as BatchNorm), then C = n1^T n2 / N
    a, b = z1.numpy(), z2.numpy()
    n1 = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    n2 = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = n1.T @ n2 / len(a)
    assert terms.on_diag.item() == pytest.approx(((1 - np.diag(c)) ** 2).sum(), rel=1e-9)
    assert terms.off_diag.item() == pytest.approx((c ** 2).sum() - (np.diag(c) ** 2).sum(), rel=1e-9)

    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="32-32"))
    optimizer = build_lars(model, 1e-6, 0.9, 0.001)
    precision = Precision.choose("fp32", torch.device("cpu"))
    spec = LossSpec(lambd=0.01, scale_loss=0.5)
    output = training_step(model, optimizer, precision.grad_scaler(), precision, spec,
                           torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), observe=True)
    assert (output.on_diag + output.off_diag).item() == pytest.approx(output.loss.item(), rel=1e-6)
    assert output.correlation is not None and output.correlation.shape == (32, 32)
    # the step's terms are those of its correlation matrix, scaled as the loss is (lambd on the off-diagonal)
    c = output.correlation.double()
    assert output.on_diag.item() == pytest.approx(0.5 * ((1 - c.diagonal()) ** 2).sum().item(), rel=1e-5)
    assert output.off_diag.item() == pytest.approx(
        0.5 * 0.01 * ((c ** 2).sum() - (c.diagonal() ** 2).sum()).item(), rel=1e-5)


def test_with_the_monitor_off_a_logged_step_gives_rankme_of_its_batch_in_the_same_transfer():
    from service.observe.step_metrics import StepClock
    from tests.support.training import WORKER
    from tests.unit.observe.test_step_metrics import rankme_by_hand

    model, optimizer = tiny_model_and_lars()
    precision = Precision.choose("fp32", torch.device("cpu"))
    y1, y2 = torch.randn(24, 3, 8, 8), torch.randn(24, 3, 8, 8)
    with torch.no_grad():
        features = model.backbone(y1).numpy()  # train mode, as in the step: the batch's own statistics
    output = training_step(model, optimizer, precision.grad_scaler(), precision, LossSpec(), y1, y2,
                           observe=True, rank=True)
    measured = read_logged_step(output, StepClock(), WORKER, 24)
    assert measured["rankme_sample"] == 24
    assert measured["rankme"] == pytest.approx(rankme_by_hand(features), rel=1e-6)
    plain = training_step(model, optimizer, precision.grad_scaler(), precision, LossSpec(), y1, y2, observe=True)
    assert "rankme" not in read_logged_step(plain, StepClock(), WORKER, 24)  # the monitor gives it otherwise
