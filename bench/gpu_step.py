"""Training-step throughput of the full recipe on one GPU: fp32 eager, then bf16, channels_last, torch.compile, and
finally the whole input path (JPEG decoding in loader processes, crop and flip per image, the colour half batched
on the GPU). Run by bench/gpu.sh; on the CPU, `--device cpu --small` only proves the script works.

    python bench/gpu_step.py --config fp32 --batch 256      # one row; bench/gpu.sh runs them all
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.augmentation import make_jpegs  # noqa: E402
from service.data.datasets import ImageFolder  # noqa: E402
from service.data.loader import LoaderSettings, two_view_loader  # noqa: E402
from service.method.color import DeviceColor  # noqa: E402
from service.method.model import BarlowTwins  # noqa: E402
from service.method.optim import build_lars  # noqa: E402
from service.method.transforms import geometric_pipeline  # noqa: E402
from service.runtime.distributed import Worker  # noqa: E402
from service.runtime.precision import Precision  # noqa: E402
from service.spec import AugmentSpec, LossSpec, ModelSpec  # noqa: E402
from service.train.placement import place_model  # noqa: E402
from service.train.step import training_step  # noqa: E402

CONFIGS = {  # name: (precision, channels_last, compile, real input)
    "fp32": ("fp32", False, False, False),
    "bf16": ("bf16", False, False, False),
    "bf16+cl": ("bf16", True, False, False),
    "bf16+cl+compile": ("bf16", True, True, False),
    "bf16+cl+compile+jpeg": ("bf16", True, True, True),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="ResNet-18, 64 px, 256-256 projector (CPU smoke test)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = parser.parse_args()
    precision_name, channels_last, compiled, real_input = CONFIGS[args.config]
    device = torch.device(args.device)
    size = 64 if args.small else 224
    model_spec = ModelSpec(backbone="resnet18" if args.small else "resnet50",
                           projector="256-256" if args.small else "8192-8192-8192")
    worker = Worker(0, 1, 0, device)
    torch.manual_seed(0)
    model, trained = place_model(BarlowTwins(model_spec), worker, channels_last=channels_last)
    if compiled:
        trained = torch.compile(trained)  # type: ignore[assignment]  # a Module's is a Module; torch types a callable
    optimizer = build_lars(model, weight_decay=1.5e-6, momentum=0.9, eta=0.001)
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    precision = Precision.choose(precision_name, device)
    scaler = precision.grad_scaler()
    loss_spec = LossSpec()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(y1, y2):
        return training_step(trained, optimizer, scaler, precision, loss_spec,
                             y1.contiguous(memory_format=memory_format), y2.contiguous(memory_format=memory_format),
                             global_batch=args.batch).loss

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as folder:
        if real_input:
            (Path(folder) / "train" / "class0").mkdir(parents=True)
            make_jpegs(Path(folder) / "train" / "class0", args.batch * min(total, 8))
            augment = AugmentSpec()
            geometric = geometric_pipeline(augment, size)
            loader, sampler = two_view_loader(ImageFolder(folder), (geometric, geometric), global_batch=args.batch,
                                              rank=0, world_size=1, seed=0,
                                              settings=LoaderSettings(args.workers, 4, device.type == "cuda"))
            color = DeviceColor(augment, size, seed=0, global_batch=args.batch)

            def batches():
                epoch = 0
                while True:
                    sampler.set_epoch(epoch)
                    for index, (y1, y2, _) in enumerate(loader):
                        y1, y2 = y1.to(device, non_blocking=True), y2.to(device, non_blocking=True)
                        yield color((y1, y2), epoch, index, (0, args.batch))
                    epoch += 1
        else:
            fixed = [torch.randn(args.batch, 3, size, size, device=device) for _ in range(2)]

            def batches():
                while True:
                    yield fixed[0], fixed[1]

        source = batches()
        for _ in range(args.warmup):
            step(*next(source))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(*next(source))
        synchronize(device)
        seconds = time.perf_counter() - start
    assert torch.isfinite(loss), loss
    print(f"{args.config} {args.batch * args.steps / seconds:.1f}")


if __name__ == "__main__":
    main()
