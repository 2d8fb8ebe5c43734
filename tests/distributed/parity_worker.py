"""Runs a few Barlow Twins steps on a fixed global batch; run it with 1 and with 2 torchrun workers.

Each worker takes its contiguous slice of the global batch (as GlobalBatchSampler does). Rank 0 saves the loss
and the gradients of the first step and the parameters after the last, for the test to compare.
    torchrun --nproc-per-node 2 tests/distributed/parity_worker.py OUT.pt [DIVISOR|none] [reduce|gather] \
        [known|measured]
`known` passes the global batch to the loss (as the training loop does: the row counts are its shards); `measured`
(the default) leaves the loss to exchange the counts.
"""

import sys

import torch

from service.method.model import BarlowTwins
from service.method.optim import LearningRateSchedule, build_lars
from service.runtime import distributed
from service.runtime.precision import Precision
from service.spec import LossSpec, ModelSpec
from service.train.placement import place_model
from service.train.step import training_step

GLOBAL_BATCH = 16
STEPS = 3


def main(out: str, divisor: int | None, communication: str, known_batch: bool) -> None:
    worker = distributed.start("cpu")
    torch.manual_seed(0)
    model, trained = place_model(
        BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="64-32")), worker, channels_last=False
    )
    optimizer = build_lars(model, weight_decay=1e-6, momentum=0.9, eta=0.001)
    schedule = LearningRateSchedule(steps_per_epoch=1, epochs=2 * STEPS, warmup_epochs=1, batch_size=GLOBAL_BATCH,
                                    lr_weights=0.2, lr_biases=0.0048)
    precision = Precision.choose("fp32", worker.device)
    scaler = precision.grad_scaler()
    generator = torch.Generator().manual_seed(1)
    share = slice(worker.rank * GLOBAL_BATCH // worker.world_size,
                  (worker.rank + 1) * GLOBAL_BATCH // worker.world_size)
    record = {}
    for step in range(STEPS):
        y1, y2 = torch.randn(2, GLOBAL_BATCH, 3, 8, 8, generator=generator)
        schedule.apply(optimizer, step + 1)
        loss_spec = LossSpec(reference_world_size=divisor, communication=communication)
        loss = training_step(trained, optimizer, scaler, precision, loss_spec,
                             y1[share], y2[share], GLOBAL_BATCH if known_batch else None).loss
        if step == 0:
            record["loss"] = loss
            record["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    record["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    record["buffers"] = {name: b.clone() for name, b in model.named_buffers()}
    if worker.is_main:
        torch.save(record, out)
    distributed.stop()


if __name__ == "__main__":
    divisor = sys.argv[2] if len(sys.argv) > 2 else "none"
    main(sys.argv[1], None if divisor == "none" else int(divisor), sys.argv[3] if len(sys.argv) > 3 else "reduce",
         len(sys.argv) > 4 and sys.argv[4] == "known")
