"""Communication plans for the cross-correlation: all-reducing the D x D matrix (the reference) against
all-gathering the embeddings, measured on gloo processes of this machine, with the bytes each moves.

    .venv/bin/python bench/communication.py                          # 2 and 4 processes, D = 2048, global batch 256
    .venv/bin/python bench/communication.py --dim 512 --batch 64 --procs 2 --steps 3    # CI size

Each configuration runs the loss forward and backward on random embeddings (no network: only the loss and its
communication), `steps` times after one warm-up, on every plan; the table gives the median time per step and the
ratio to `reduce` measured in the same run, and the bytes per worker and step from the collectives' sizes.
bench/README.md extrapolates to 16 and 128 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLANS = ("reduce", "gather")


def bytes_per_step(plan: str, world: int, batch: int, dim: int, element: int = 4) -> float:
    """Bytes each worker sends per step under ring collectives (all-reduce 2(W-1)/W x size, all-gather (W-1)/W)."""
    ring = (world - 1) / world
    if plan == "reduce":  # D x D forward and its gradient backward; the per-dimension statistics (4 D, twice)
        return element * (2 * 2 * ring * dim * dim + 2 * 2 * ring * 4 * dim)
    return element * ring * 2 * batch * dim  # both views' embeddings forward; nothing backward


def worker(args: argparse.Namespace) -> None:
    import torch

    from service.method.loss import barlow_twins_loss
    from service.runtime import distributed

    handle = distributed.start("cpu")
    rows = distributed.shard(args.batch, handle.rank, handle.world_size)
    generator = torch.Generator().manual_seed(handle.rank)
    results = {}
    for plan in PLANS:
        times = []
        for step in range(args.steps + 1):
            z1 = torch.randn(len(rows), args.dim, generator=generator, requires_grad=True)
            z2 = torch.randn(len(rows), args.dim, generator=generator, requires_grad=True)
            torch.distributed.barrier()
            start = time.perf_counter()
            barlow_twins_loss(z1, z2, communication=plan, global_batch=args.batch).backward()
            torch.distributed.barrier()
            if step:  # the first is a warm-up
                times.append(time.perf_counter() - start)
        results[plan] = statistics.median(times)
    if handle.is_main:
        Path(args.out).write_text(json.dumps(results))
    distributed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048, help="embedding size D")
    parser.add_argument("--batch", type=int, default=256, help="global batch N")
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="worker counts")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"loss forward + backward, D = {args.dim}, global batch {args.batch}, gloo on {os.cpu_count()} cores")
    print(f"{'workers':>8} {'plan':>8} {'ms/step':>9} {'ratio':>7} {'MB/worker/step':>15}")
    for world in args.procs:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "times.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                            __file__, "--worker", "--out", str(out), "--dim", str(args.dim), "--batch",
                            str(args.batch), "--steps", str(args.steps)],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            times = json.loads(out.read_text())
        for plan in PLANS:
            megabytes = bytes_per_step(plan, world, args.batch, args.dim) / 1e6
            print(f"{world:>8} {plan:>8} {1000 * times[plan]:>9.1f} {times[plan] / times['reduce']:>7.2f} "
                  f"{megabytes:>15.2f}")


if __name__ == "__main__":
    main()
