"""What a logged step costs: the trainer's step unlogged, against the same step logged as the reference logs it
(the loss read, a stats.txt line), as this service logs it (the loss's terms, collapse signal, throughput, data
wait and memory read with one transfer, a stats.txt line and TensorBoard scalars), with the cross-correlation
image too, and, as a run without the kNN monitor logs, with RankMe of the step's batch (its features' Gram matrix
in the same transfer, its eigenvalues on the host), in one run.

    .venv/bin/python bench/logging_cost.py                        # ResNet-18 (CIFAR stem), 32 px, batch 64
    .venv/bin/python bench/logging_cost.py --batch 8 --steps 2    # CI size

Every row logs every step (the worst case; runs log every `run.log_every` steps, 100 by default, so a run pays a
hundredth of the difference). The ratio is the unlogged step's time over the row's (median over steps, after
warm-up). On the CPU no step waits for a device; on a GPU a logged step waits for the device once, as the
reference's `loss.item()` did (bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.method.model import BarlowTwins  # noqa: E402
from service.method.optim import build_lars  # noqa: E402
from service.observe.stats import TrainingStats  # noqa: E402
from service.observe.step_metrics import StepClock  # noqa: E402
from service.observe.tensorboard import EventFiles  # noqa: E402
from service.runtime import distributed  # noqa: E402
from service.runtime.guard import NonFiniteGuard  # noqa: E402
from service.runtime.precision import Precision  # noqa: E402
from service.spec import LossSpec, ModelSpec, StorageSpec  # noqa: E402
from service.train.step import read_logged_step, training_step  # noqa: E402

PROJECTOR = "1024-1024-1024"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    worker = distributed.Worker(rank=0, world_size=1, local_rank=0, device=device)
    generator = torch.Generator().manual_seed(0)
    inputs = [tuple(torch.randn(2, args.batch, 3, args.size, args.size, generator=generator))
              for _ in range(args.steps + 2)]
    torch.manual_seed(0)
    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector=PROJECTOR))
    optimizer = build_lars(model, weight_decay=1.5e-6, momentum=0.9, eta=0.001)
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    precision = Precision.choose("fp32", device)
    scaler = precision.grad_scaler()
    loss_spec = LossSpec()
    guard = NonFiniteGuard(device, first_step=0)
    clock = StepClock()

    with tempfile.TemporaryDirectory() as folder:
        def stats(tensorboard: bool) -> TrainingStats:
            output = f"{folder}/{'tensorboard' if tensorboard else 'plain'}"
            events = EventFiles(output, StorageSpec(), purge_step=0) if tensorboard else None
            return TrainingStats(output, StorageSpec(), "bench", total_steps=0, enabled=True, events=events)

        reference_stats, our_stats = stats(False), stats(True)

        def unlogged(y1, y2, step):
            training_step(model, optimizer, scaler, precision, loss_spec, y1, y2, args.batch, guard)

        def reference(y1, y2, step):
            loss = training_step(model, optimizer, scaler, precision, loss_spec, y1, y2, args.batch, guard).loss
            reference_stats.log(epoch=0, step=step, lr_weights=0.01, lr_biases=0.01, loss=loss.item())

        def ours(y1, y2, step, image=False, rank=False):
            output = training_step(model, optimizer, scaler, precision, loss_spec, y1, y2, args.batch, guard,
                                   observe=True, rank=rank)
            clock.step_done()
            measured = read_logged_step(output, clock, worker, args.batch)
            our_stats.log(epoch=0, step=step, lr_weights=0.01, lr_biases=0.01, loss=measured.pop("loss"), **measured)
            if image:
                assert output.correlation is not None
                our_stats.correlation(step, output.correlation.cpu().numpy())

        rows = (("unlogged step", unlogged), ("logged as the reference (loss, stats.txt)", reference),
                ("logged as here (all fields, TensorBoard)", ours),
                ("+ the cross-correlation image", lambda y1, y2, step: ours(y1, y2, step, image=True)),
                ("as here, monitor off: + RankMe of the batch", lambda y1, y2, step: ours(y1, y2, step, rank=True)))
        # rounds interleave the rows, so that a machine's drift reaches each of them alike
        times: dict[str, list[float]] = {name: [] for name, _ in rows}
        for step, (y1, y2) in enumerate(inputs):
            for name, run in rows:
                started = time.perf_counter()
                run(y1, y2, step)
                if step >= 2:
                    times[name].append(time.perf_counter() - started)
        reference_stats.close()
        our_stats.close()
    base = statistics.median(times["unlogged step"])
    print(f"ResNet-18 (CIFAR stem) + {PROJECTOR}, {args.size} px, batch {args.batch}, fp32, {args.threads} "
          "thread(s), every step logged")
    print(f"{'step':<44} {'ms':>8} {'ratio':>7}")
    for name, _ in rows:
        seconds = statistics.median(times[name])
        print(f"{name:<44} {seconds * 1000:>8.1f} {base / seconds:>7.3f}")


if __name__ == "__main__":
    main()
