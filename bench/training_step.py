"""Training-step throughput on the CPU: our step against one assembled from lightly's BarlowTwinsProjectionHead,
BarlowTwinsLoss and LARS, with the same backbone, batch and inputs, in one run.

    .venv/bin/python bench/training_step.py                          # ResNet-18 (CIFAR stem), 32 px, batch 64
    .venv/bin/python bench/training_step.py --batch 8 --steps 2      # CI size

Both: torchvision's ResNet-18 without fc, a 3-layer projector (the reference's layout, 1024-1024-1024 here), fp32,
one process, both views through the backbone, loss, backward, LARS (momentum 0.9, trust 0.001, biases and
BatchNorm exempt from decay and trust ratio), zero_grad. Ours is service.train.step.training_step on BarlowTwins with
our multi-tensor LARS, without and with the non-finite guard the trainer adds (a finiteness check of the loss and
the gradients, and LARS made conditional on it); the ratio is to lightly's step, measured in the same run (median
over steps, after warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import import_lightly  # noqa: E402
from service.method.model import BarlowTwins, build_backbone  # noqa: E402
from service.method.optim import build_lars  # noqa: E402
from service.runtime.guard import NonFiniteGuard  # noqa: E402
from service.runtime.precision import Precision  # noqa: E402
from service.spec import LossSpec, ModelSpec  # noqa: E402
from service.train.step import training_step  # noqa: E402

PROJECTOR = "1024-1024-1024"


def median_step_time(step, inputs, warmup: int, steps: int) -> float:
    for y1, y2 in inputs[:warmup]:
        step(y1, y2)
    times = []
    for y1, y2 in inputs[warmup:warmup + steps]:
        start = time.perf_counter()
        step(y1, y2)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lightly = import_lightly()
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead
    from lightly.utils.lars import LARS

    generator = torch.Generator().manual_seed(0)
    inputs = [tuple(torch.randn(2, args.batch, 3, args.size, args.size, generator=generator))
              for _ in range(args.steps + 2)]

    torch.manual_seed(0)
    ours = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector=PROJECTOR))
    optimizer = build_lars(ours, weight_decay=1.5e-6, momentum=0.9, eta=0.001)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    precision = Precision.choose("fp32", torch.device("cpu"))
    scaler = precision.grad_scaler()
    loss_spec = LossSpec(lambd=0.005)
    ours_time = median_step_time(
        lambda y1, y2: training_step(ours, optimizer, scaler, precision, loss_spec, y1, y2, args.batch),
        inputs, 2, args.steps)
    guard = NonFiniteGuard(torch.device("cpu"), first_step=0)  # what the trainer runs: every step checked
    guarded_time = median_step_time(
        lambda y1, y2: training_step(ours, optimizer, scaler, precision, loss_spec, y1, y2, args.batch, guard),
        inputs, 2, args.steps)

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", "cifar")
    hidden = int(PROJECTOR.split("-")[0])
    head = BarlowTwinsProjectionHead(512, hidden, int(PROJECTOR.split("-")[-1]))
    model = torch.nn.Sequential(backbone, head)
    criterion = BarlowTwinsLoss(lambda_param=0.005)
    decay = [p for p in model.parameters() if p.ndim > 1]
    exempt = [p for p in model.parameters() if p.ndim == 1]
    lars = LARS([{"params": decay}, {"params": exempt, "weight_decay": 0.0, "trust_coefficient": 0.0}],
                lr=0.1, momentum=0.9, weight_decay=1.5e-6)

    def theirs(y1, y2):
        lars.zero_grad(set_to_none=True)
        loss = criterion(model(y1), model(y2))
        loss.backward()
        lars.step()
        return loss.detach()

    theirs_time = median_step_time(theirs, inputs, 2, args.steps)
    print(f"ResNet-18 (CIFAR stem) + {PROJECTOR}, {args.size} px, batch {args.batch}, fp32, {args.threads} thread(s)")
    print(f"{'step':<36} {'images/s':>9} {'ratio':>7}")
    for name, seconds in (("ours (training_step, foreach LARS)", ours_time),
                          (f"lightly {lightly.__version__} head + loss + LARS", theirs_time),
                          ("ours + non-finite guard (the trainer)", guarded_time)):
        print(f"{name:<36} {args.batch / seconds:>9.1f} {theirs_time / seconds:>7.2f}")


if __name__ == "__main__":
    main()
