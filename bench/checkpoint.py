"""Checkpoint benchmark: the full ImageNet recipe's training state against the S3 test server, in one run.

    .venv/bin/python bench/checkpoint.py            # ResNet-50 + 8192-8192-8192 + LARS momentum (~1.33 GiB)
    .venv/bin/python bench/checkpoint.py --small    # ResNet-18 + 512-512 (CI: proves the script works)

Reports, for our checkpoint manager (DCP through fsspec, async): the training stall of a save (the time save()
blocks), the total save time until the manifest is committed, and the load time; each as a ratio to a plain
`torch.save` / `torch.load` of the same state to a local file, and to a plain single-stream s3fs upload /
download of those same bytes. moto bounds the S3 throughput (~100 MiB/s here): compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.checkpoint.manager import CheckpointManager  # noqa: E402
from service.method.model import BarlowTwins  # noqa: E402
from service.method.optim import build_lars  # noqa: E402
from service.runtime.distributed import Worker  # noqa: E402
from service.spec import CheckpointSpec, StorageSpec, TrainSpec  # noqa: E402
from service.storage.filesystem import filesystem  # noqa: E402
from tests.support.s3_server import TEST_CREDENTIALS, S3Server  # noqa: E402


def training_state(model_section: dict):
    spec = TrainSpec.model_validate({"data": {"dataset": "digits"}, "model": model_section})
    model = BarlowTwins(spec.model)
    optimizer = build_lars(model, weight_decay=1e-6, momentum=0.9, eta=0.001)
    for p in model.parameters():  # LARS momentum, as after the first step
        optimizer.state[p]["mu"] = torch.randn_like(p)
    return spec, model, optimizer


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small model, to check the script quickly")
    args = parser.parse_args()
    model_section = ({"backbone": "resnet18", "projector": "512-512"} if args.small
                     else {"backbone": "resnet50", "projector": "8192-8192-8192"})
    os.environ.update(TEST_CREDENTIALS)
    server = S3Server().start()
    try:
        bucket = server.create_bucket("bench")
        storage = StorageSpec(endpoint_url=server.endpoint_url)
        spec, model, optimizer = training_state(model_section)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        size = sum(t.numel() * t.element_size() for t in state["model"].values()) + sum(
            s["mu"].numel() * s["mu"].element_size() for s in state["optimizer"]["state"].values())
        parameters = sum(p.numel() for p in model.parameters())
        worker = Worker(0, 1, 0, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def manager(run: str, resume: str = "auto") -> CheckpointManager:
            return CheckpointManager(run_url=run, spec=CheckpointSpec(resume=resume), storage=storage,
                                     worker=worker, model=model, optimizer=optimizer, scaler=scaler,
                                     steps_per_epoch=100, resolved_spec=spec.model_dump(mode="json"), lease=None)

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "state.pth"
            fs, _ = filesystem(bucket, storage)
            plain_save = timed(lambda: torch.save(state, local))
            plain_upload = timed(lambda: fs.put_file(str(local), "bench/plain/state.pth"))
            download = Path(tmp) / "downloaded.pth"
            plain_load = timed(lambda: torch.load(local, weights_only=True))
            plain_download = timed(lambda: fs.get_file("bench/plain/state.pth", str(download)))

            ours = manager(f"{bucket}/run", resume="none")
            start = time.perf_counter()
            ours.save(1)
            stall = time.perf_counter() - start
            ours.wait()
            total = time.perf_counter() - start
            ours.close()
            assert ours.committed == [1], "the benchmark's save failed"
            load = timed(lambda: manager(f"{bucket}/run").restore())

        rows = [
            ("training stall of a save", stall, plain_save, plain_upload),
            ("save, until committed", total, plain_save, plain_upload),
            ("load", load, plain_load, plain_download + plain_load),
        ]
        print(f"state: {model_section['backbone']} + projector {model_section['projector']} + LARS momentum: "
              f"{parameters / 1e6:.1f}M parameters, {size / 2**30:.2f} GiB; S3: moto at {server.endpoint_url}")
        print(f"{'':28}{'ours (s)':>10}{'torch.save/load local (s)':>27}{'ratio':>8}"
              f"{'s3fs single stream (s)':>24}{'ratio':>8}")
        for name, value, local_time, s3_time in rows:
            print(f"{name:28}{value:10.2f}{local_time:27.2f}{value / local_time:8.2f}{s3_time:24.2f}"
                  f"{value / s3_time:8.2f}")
        print("ratio < 1: ours takes less time. The s3fs load column is download + torch.load.")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
